from polyrot.cli import main

main()
