"""polyrot: the paper "Polymorphism Is Rotation" as tracked, reproducible software."""

__version__ = "0.1.0"
