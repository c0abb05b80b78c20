"""What a Slurm job asks for, read from an experiment file, and reproduce's Slurm options at the
command line (no Slurm needed: the team tests run the executor itself)."""

import textwrap

import pytest

from polyrot.errors import PolyrotError
from polyrot.experiments import pipeline, slurm
from polyrot.experiments.resources import Resources, for_stage
from tests.conftest import cli, one_line_error

GRAPH = """\
name: res
profiles:
  cpu: {}
  paper: {}
resources:
  cpu:
    default: {cpus: 1, mem: 3G}
    train_seed: {cpus: 2}
  paper:
    train_seed: {cpus: 4, mem: 16G, gpus: 1, time: "04:00:00"}
nodes:
  - id: seed0
    stage: train_seed
    params: {seed: 0}
"""


def load(tmp_path, body: str, profile: str = "cpu"):
    path = tmp_path / "res.yaml"
    path.write_text(textwrap.dedent(body))
    return pipeline.load_experiment(str(path), profile)


def test_a_stage_without_an_entry_gets_the_profile_default():
    exp = pipeline.load_experiment("smoke", "cpu")
    assert for_stage(exp.resources, "audit") == Resources(cpus=1, mem="2G")


def test_resources_per_profile_and_stage(tmp_path):
    cpu = load(tmp_path, GRAPH)
    assert for_stage(cpu.resources, "train_seed") == Resources(cpus=2, mem="3G")   # mem from default
    assert for_stage(cpu.resources, "audit") == Resources(cpus=1, mem="3G")
    paper = load(tmp_path, GRAPH, "paper")
    assert slurm.flags(for_stage(paper.resources, "train_seed"), "gpu", None) == [
        "--cpus-per-task=4", "--mem=16G", "--gres=gpu:1", "--partition=gpu", "--time=04:00:00"]
    # --time on the command line wins over the file's.
    assert slurm.flags(for_stage(paper.resources, "train_seed"), None, "30")[-1] == "--time=30"


def test_the_shipped_experiments_ask_a_gpu_for_train_seed_under_the_paper_profile():
    for name in ("smoke", "dyck3-cohort-a", "dyck3-cohort-b"):
        assert for_stage(pipeline.load_experiment(name, "paper").resources, "train_seed").gpus == 1
        assert for_stage(pipeline.load_experiment(name, "cpu").resources, "train_seed").gpus == 0


@pytest.mark.parametrize("entry, message", [
    ("    bogus_stage: {cpus: 1}", "res.yaml:10: resources for unknown stage 'bogus_stage'"),
    ("    audit: {cpus: 0}", "res.yaml:10: resources cpus must be an integer >= 1, got 0"),
    ("    audit: {mem: lots}", "res.yaml:10: resources mem must look like 2G, 500M or 4096, got 'lots'"),
    ("    audit: {time: soon}", "res.yaml:10: resources time must look like"),
    ("    audit: {disk: 1G}", "res.yaml:10: resources have no field 'disk'"),
])
def test_bad_resources_name_file_and_line(tmp_path, entry, message):
    body = GRAPH.replace("    train_seed: {cpus: 4, mem: 16G, gpus: 1, time: \"04:00:00\"}", entry)
    with pytest.raises(PolyrotError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, body, "paper")


def test_slurm_options_need_the_slurm_executor_and_a_boolean_flag_alone_means_true():
    one_line_error(cli("reproduce", "smoke", "--no-wait"), "--no-wait need(s) --executor slurm")
    one_line_error(cli("reproduce", "smoke", "--partition", "gpu"), "--partition need(s) --executor slurm")
    # A word the flag would swallow is refused, not read as false.
    result = cli("reproduce", "--no-wait", "smoke")
    assert result.exit_code == 2 and "Invalid value for '--no-wait'" in result.output
