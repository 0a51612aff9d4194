"""Planning for several GPUs and machines: the Cluster input, the sharding knobs' rules, the search over
DDP/FSDP, the CLI's --gpus/--machines and the accelerate config a plan writes."""

import json
import pickle
import re

import pytest
import yaml
from typer.testing import CliRunner

from autofit.cli import app
from autofit.cluster import Cluster, make_cluster
from autofit.devices import get_device
from autofit.knobs import Knobs
from autofit.launch import launch_command
from autofit.plan import Plan
from autofit.search import NoPlanFitsError, exhaustive_best, search
from autofit.search.space import SearchSpace

from _profiles import cached_models, make_profile, searched_plan, skewed_workload

runner = CliRunner()


def test_make_cluster_defaults_and_bandwidths():
    assert make_cluster(4).interconnect == "pcie"
    assert make_cluster(2, device_kind="cpu").interconnect == "shared-memory"
    two_machines = make_cluster(8, 2, interconnect="nvlink", network="infiniband")
    assert (two_machines.per_machine, two_machines.bandwidth_gbs) == (4, 50.0)  # the network is the slower link
    assert make_cluster(8, interconnect="nvlink").bandwidth_gbs == 300.0
    assert "8 processes on 2 machines" in two_machines.describe()


@pytest.mark.parametrize("args, message", [
    (dict(gpus=2, machines=3), "3 machines need at least 3 GPUs"),
    (dict(gpus=6, machines=4), "6 GPUs do not spread evenly over 4 machines"),
    (dict(gpus=0), "gpus must be a whole number"),
    (dict(gpus=True), "gpus must be a whole number"),
    (dict(gpus=2, interconnect="carrier-pigeon"), "unknown interconnect"),
    (dict(gpus=2, network="wifi"), "unknown network"),
])
def test_bad_cluster_input_says_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message):
        make_cluster(**args)


@pytest.mark.parametrize("knobs, message", [
    (dict(strategy="fsdp", optimizer_bits=8), "8-bit AdamW does not step FSDP"),
    (dict(reshard_after_forward=False), "only apply with strategy=fsdp"),
    (dict(cpu_offload=True), "only apply with strategy=fsdp"),
    (dict(fsdp_unit_layers=2), "only apply with strategy=fsdp"),
])
def test_sharding_knob_rules(knobs, message):
    with pytest.raises(ValueError, match=message):
        Knobs(**knobs)
    with pytest.raises(ValueError, match="fsdp_unit_layers=5 but the model has 4 layers"):
        Knobs(strategy="fsdp", fsdp_unit_layers=5).validate_for(4)


def test_the_search_space_offers_sharding_only_with_several_processes():
    workload = skewed_workload(n=100, batch_size=8)
    from autofit.policy import load_policy

    policy = load_policy("fastest")
    alone = SearchSpace(policy, 2, workload, get_device("a100"))
    assert "sharding" not in alone.dims
    shared = SearchSpace(policy, 2, workload, get_device("a100"), cluster=Cluster(processes=2))
    assert shared.dims["sharding"] == ["ddp", "fsdp", "fsdp:2", "fsdp:keep", "fsdp:offload"]
    on_cpu = SearchSpace(policy, 2, workload, get_device("cpu"), cluster=Cluster(processes=2))
    assert "fsdp:offload" not in on_cpu.dims["sharding"]  # offloading to the CPU from the CPU: nothing
    knobs = list(shared.enumerate())
    assert {k.strategy for k in knobs} == {"ddp", "fsdp"}
    assert all(k.optimizer_bits == 32 for k in knobs if k.strategy == "fsdp")  # 8-bit points fall back
    assert any(k.optimizer_bits == 8 for k in knobs if k.strategy == "ddp")


@pytest.mark.parametrize("budget_mb", [560, 900])
def test_the_study_finds_the_brute_force_optimum_over_strategies(budget_mb):
    profile, workload = make_profile(hidden=128, layers=4, vocab=8000), skewed_workload(n=300, batch_size=16)
    cluster, a100 = Cluster(processes=4), get_device("a100")
    models = cached_models()
    found = search(profile, workload, a100, budget_mb * 2**20, "balanced", cluster=cluster, **models)
    best = exhaustive_best(profile, workload, a100, budget_mb * 2**20, "balanced", cluster=cluster, **models)
    assert found.best.score <= best.score * 1.01
    assert found.best.peak_bytes <= budget_mb * 2**20 - found.headroom_bytes


def test_sharding_fits_a_budget_one_process_cannot():
    profile, workload = make_profile(hidden=256, layers=8, vocab=30000), skewed_workload(n=300, batch_size=16)
    a100 = get_device("a100")
    shared = search(profile, workload, a100, 650 * 2**20, "quality-first", cluster=Cluster(processes=4))
    assert shared.knobs.strategy == "fsdp" and shared.knobs.adapter == "none"
    with pytest.raises(NoPlanFitsError):
        search(profile, workload, a100, 650 * 2**20, "quality-first")


def test_plan_files_keep_the_cluster_and_old_files_load_as_one_process(tmp_path):
    plan = searched_plan().model_copy(update={"cluster": Cluster(processes=2)})
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.cluster == Cluster(processes=2) and again.step.processes == 2
    data = json.loads(path.read_text())
    del data["cluster"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Plan.load(tmp_path / "old.json").cluster.processes == 1


def test_the_accelerate_config_says_what_the_plan_does(tmp_path):
    plan = searched_plan()
    knobs = Knobs(strategy="fsdp", reshard_after_forward=False, precision="bf16")
    plan = plan.model_copy(update={"knobs": knobs, "cluster": Cluster(processes=8, machines=2)})
    config = yaml.safe_load(plan.to_accelerate_config(tmp_path / "acc.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_reshard_after_forward"] is False
    assert (config["num_processes"], config["num_machines"], config["mixed_precision"]) == (8, 2, "bf16")
    replicas = plan.model_copy(update={"knobs": Knobs(), "cluster": Cluster(processes=2)})
    config = yaml.safe_load(replicas.to_accelerate_config(tmp_path / "ddp.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in config
    assert "--machine_rank" in launch_command("acc.yaml", "plan.json", machines=2)


def test_cli_plans_a_7b_decoder_over_gpus_and_machines(tmp_path):
    """Issue 10's acceptance: full fine-tuning of Llama-2-7B on four 24 GB GPUs (sharded: a replica does not
    fit), on eight over two machines, and a 16 GB pair of GPUs."""
    args = ["plan", "--model", "meta-llama/Llama-2-7b-hf", "--vram", "24GB", "--policy", "quality-first",
            "--adapter", "none", "--json"]
    for extra in (["--gpus", "4"], ["--gpus", "8", "--machines", "2"]):
        result = runner.invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        plan = Plan.model_validate_json(result.stdout)
        assert plan.knobs.adapter == "none" and plan.knobs.strategy == "fsdp"
        assert plan.cluster.processes == int(extra[1]) and plan.predicted.gathered > 0
        assert plan.predicted.peak_bytes <= plan.budget_bytes - plan.headroom_bytes
    result = runner.invoke(app, ["plan", "--model", "meta-llama/Llama-2-7b-hf", "--vram", "16GB", "--gpus", "2",
                                 "--accelerate-config", tmp_path / "acc.yaml"])
    assert result.exit_code == 0, result.output
    assert "per process" in result.stdout and "2 processes" in result.stdout
    assert (tmp_path / "acc.yaml").exists()


def test_cli_refuses_a_batch_smaller_than_the_gpus():
    result = runner.invoke(app, ["plan", "--model", "bert-base-uncased", "--vram", "16GB", "--gpus", "8",
                                 "--batch-size", "4"])
    assert result.exit_code == 1 and "cannot give each of 8 processes one" in result.stderr
    result = runner.invoke(app, ["plan", "--model", "bert-base-uncased", "--vram", "16GB", "--gpus", "3",
                                 "--machines", "2"])
    assert result.exit_code == 1 and "do not spread evenly" in result.stderr


def test_cpu_offload_must_fit_the_machines_ram():
    """Llama-2-7B on four 24 GB GPUs fits only with offload (a replica's states do not fit); with 64 GB of CPU RAM
    per machine its ~100 GB of shards do not fit either: no plan fits, and the smallest budget named is one the
    machines can hold."""
    args = ["plan", "--model", "meta-llama/Llama-2-7b-hf", "--vram", "24GB", "--gpus", "4", "--policy",
            "quality-first", "--adapter", "none", "--json"]
    roomy = runner.invoke(app, args + ["--host-memory", "512GB"])
    assert roomy.exit_code == 0, roomy.output
    plan = Plan.model_validate_json(roomy.stdout)
    assert plan.knobs.cpu_offload and plan.offloaded_bytes <= 512 * 2**30
    tight = runner.invoke(app, args + ["--host-memory", "64GB"])
    assert tight.exit_code == 2 and "no plan fits" in tight.stderr
    needed = re.search(r"smallest budget that fits is ([0-9.]+) GB", tight.stderr)
    assert needed and float(needed.group(1)) > 24  # not the offload plan's, which the RAM cannot hold


def test_options_for_several_gpus_say_when_they_change_nothing(caplog):
    with caplog.at_level("INFO", logger="autofit"):
        make_cluster(1, interconnect="nvlink", network="infiniband", host_memory_bytes=2**30)
    assert "--interconnect, --network, --host-memory change nothing on one GPU" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="autofit"):
        make_cluster(4, network="infiniband")
        make_cluster(4, 2, interconnect="nvlink", network="infiniband", host_memory_bytes=2**30)
    assert caplog.text.count("change") == 1 and "--network changes nothing on one machine" in caplog.text


def test_no_plan_fits_for_several_gpus_names_how_they_share_the_model():
    knobs = Knobs(strategy="fsdp", fsdp_unit_layers=1, micro_batch_size=1)
    error = NoPlanFitsError(8 * 2**30, 17 * 2**30, knobs, 16 * 2**30, num_layers=32, processes=8)
    assert str(error).startswith("no plan fits in 8.0 GB per GPU; the smallest budget that fits is 17.0 GB per GPU (")
    assert "FSDP2: weights, gradients and AdamW state sharded over 8 processes, 1 layer per unit" in str(error)
    alone = NoPlanFitsError(8 * 2**30, 17 * 2**30, Knobs(), 16 * 2**30, num_layers=32)
    assert "per GPU" not in str(alone) and "process" not in str(alone)
    on_cpus = NoPlanFitsError(8 * 2**30, 17 * 2**30, knobs, 16 * 2**30, num_layers=32, processes=2,
                              device_kind="cpu")
    assert str(on_cpus).startswith("no plan fits in 8.0 GB per process; the smallest budget that fits is 17.0 GB "
                                   "per process (")
    sent = pickle.loads(pickle.dumps(on_cpus))  # what the main process of a launch sends the others
    assert type(sent) is NoPlanFitsError and str(sent) == str(on_cpus)
    assert (sent.smallest_budget_bytes, sent.knobs) == (17 * 2**30, knobs)


def test_alternatives_weigh_micro_batches_at_what_a_process_can_run():
    """A cap above a process's share of the step changes nothing: no alternative offers it, none says it."""
    from autofit.search.result import changed_techniques

    chosen, bigger = Knobs(micro_batch_size=8), Knobs(micro_batch_size=32, freeze_embeddings=True)
    assert changed_techniques(chosen, bigger, 12) == ["freezing", "micro-batch"]
    assert changed_techniques(chosen, bigger, 12, share=8) == ["freezing"]
    assert changed_techniques(Knobs(micro_batch_size=4), bigger, 12, share=8) == ["freezing", "micro-batch"]


def test_the_process_group_is_closed_only_when_every_process_failed_together(monkeypatch):
    """An error every process raises at the same point (the main process's plan failing) closes the group;
    one process's own error leaves it open: the others wait in a collective (NCCL's destroy would too)."""
    import torch.distributed as dist

    from autofit import processes

    closed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: closed.append(True))
    alone = ValueError("this process only")
    processes.close_process_group(alone)
    assert closed == []
    together = ValueError("every process")
    together.failed_together = True
    processes.close_process_group(together)
    assert closed == [True]
    monkeypatch.setattr(dist, "destroy_process_group", lambda: 1 / 0)
    processes.close_process_group(together)  # a failing close is not the error to report
