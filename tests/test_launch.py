"""launch/: the Slurm batch file trains under a real one-node Slurm (slurm_cluster.py), and a
job requeued mid-run ends as an uninterrupted run does; the Kubernetes manifests are read into
the kubernetes client's models of their kinds; the SkyPilot task is read by SkyPilot's own
loader.
prepare_slurm.sbatch runs under Slurm in test_commoncrawl.py, against its fake crawl."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import prepare
import train
from owngpt.checkpoint import MANIFEST_FILE
from helpers import (ONE_THREAD, ROOT, TINY_MODEL, assert_same, cannot_run_here, checkout, read_metrics,
                     train_lines, trained_iterations, wait_until, without_timings)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


# ----------------------------------------------------------------------------- Slurm
# The test cluster's one node has no GPU and as many CPUs as this machine: sbatch's options
# replace the file's #SBATCH lines, as on a cluster of other nodes; two tasks are two torchruns
# of one process each, meeting as two nodes would.
ON_THIS_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def rank_process(cluster, job_id, rank):
    """The pid of the job's training process of this rank, from the processes of its step 0."""
    for line in cluster.run("scontrol", "listpids", job_id, check=False).splitlines()[1:]:
        pid, _, step = line.split()[:3]
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if step == "0" and f"RANK={rank}".encode() in environment:
            return int(pid)
    return None


def has_signal_or_runs(pid, number):
    """Whether the stopped process pid has signal number pending, or runs (or ended) already."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return True
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return bool(pending & 1 << (number - 1)) or not status["State"].startswith("T")


@pytest.mark.slow
@pytest.mark.parametrize("parallelism, stop", [("ddp", "scontrol requeue"), ("fsdp", "the time limit's signal")])
def test_a_slurm_job_requeued_mid_run_ends_with_the_losses_and_weights_of_an_uninterrupted_run(
        parallelism, stop, slurm, tiny_dataset, tmp_path):
    flags = [*TINY_MODEL, f"--dataset={tiny_dataset}", f"--parallelism={parallelism}", "--max_iters=20",
             "--gradient_accumulation_steps=2", "--eval_interval=10", "--sample_every_eval=false"]
    clone, out_dir = checkout(tmp_path / "owngpt"), tmp_path / "out"
    job = slurm.submit("launch/train_slurm.sbatch", *flags, f"--out_dir={out_dir}", options=ON_THIS_NODE, cwd=clone)
    wait_until(lambda: rank_process(slurm, job, 1), timeout=300)
    rank_1 = rank_process(slurm, job, 1)
    wait_until(lambda: trained_iterations(out_dir) >= 3, timeout=300)
    os.kill(rank_1, signal.SIGSTOP)  # now the run goes no further than rank 1's next all-reduce, whatever the clock
    if stop == "scontrol requeue":  # as a preemption does: SIGCONT and SIGTERM to every process of the job
        slurm.run("scontrol", "requeue", job)
    else:  # what --signal=B:USR1@300 sends to the batch shell alone, 300 s before the time limit
        slurm.run("scancel", "--batch", "--signal=USR1", job)
    wait_until(lambda: has_signal_or_runs(rank_1, signal.SIGTERM), timeout=300)
    os.kill(rank_1, signal.SIGCONT)

    # the uninterrupted run, while the requeued job waits to start again
    reference = subprocess.run([*TORCHRUN, str(ROOT / "train.py"), *flags, f"--out_dir={tmp_path / 'reference'}"],
                               capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert reference.returncode == 0, reference.stderr
    ended, restarts = slurm.wait_for_end(job), slurm.job(job)["Restarts"]
    print(f"job {job} ({stop}): {ended}, restarts {restarts}")
    assert ended == {job: ("COMPLETED", "None")}
    assert restarts == "1"
    log = (clone / f"owngpt-train_{job}.log").read_text()  # both runs', appended
    stopped_at = int(re.search(r"stopped at iteration (\d+): continue with --init_from=resume", log)[1])
    assert 3 <= stopped_at < 20
    assert f"Slurm requeue 1: continuing from the newest valid checkpoint in {out_dir}" in log
    assert f"resuming from {out_dir / f'ckpt_{stopped_at:07d}.pt'} at iteration {stopped_at}, exactly" in log
    print(f"stopped at iteration {stopped_at}, resumed exactly; losses after the requeue and uninterrupted: "
          f"{[line['loss'] for line in train_lines(out_dir)][-3:]} {[line['loss'] for line in train_lines(tmp_path / 'reference')][-3:]}")
    assert without_timings(read_metrics(out_dir)) == without_timings(read_metrics(tmp_path / "reference"))
    ends = [torch.load(folder / "ckpt.pt", weights_only=True) for folder in (out_dir, tmp_path / "reference")]
    assert ends[0]["iter_num"] == 20
    for key in ("model", "optimizer"):
        assert_same(ends[0][key], ends[1][key], key)


@pytest.mark.slow
def test_prepare_jobs_their_partition_can_never_run_are_cancelled_at_once_saying_why(slurm, tmp_path):
    # the test cluster's partition "short" allows one minute, the file's tasks ask for hours
    clone = checkout(tmp_path / "owngpt")
    submitted = subprocess.run(["bash", "launch/prepare_slurm.sbatch", "2", "--source=commoncrawl"], cwd=clone,
                               capture_output=True, text=True, timeout=120, env={**slurm.env, "SBATCH_PARTITION": "short"})
    assert submitted.returncode == 1
    job = re.fullmatch(r"error: job (\d+) cannot run in its partition \(Partition\w+\): ask for fewer cores, less "
                       r"memory or time in launch/prepare_slurm.sbatch's #SBATCH lines or MERGE; both jobs are "
                       r"cancelled\n", submitted.stderr)[1]
    merge = str(int(job) + 1)
    assert [state for state, _ in slurm.states(f"{job},{merge}").values()] == ["CANCELLED", "CANCELLED"]


# ----------------------------------------------------------------------------- Kubernetes
def kubernetes_objects(name):
    """The documents of launch/name as the kubernetes client's models of their kinds (V1Job...).
    The models check each value's type and drop the keys they do not know: a manifest that
    does not come back whole from its models has a key Kubernetes does not know."""
    try:
        from kubernetes import client
    except ImportError:
        cannot_run_here("reading the manifests needs the kubernetes package (pip install kubernetes)")
    api, objects = client.ApiClient(), []
    for document in yaml.safe_load_all((ROOT / "launch" / name).read_text()):
        kind = document["apiVersion"].split("/")[-1].capitalize() + document["kind"]  # batch/v1 Job: V1Job
        model = api.deserialize(json.dumps(document), kind, "application/json")
        assert api.sanitize_for_serialization(model) == document, f"{name}: a {kind} holds a key Kubernetes does not know"
        objects.append(model)
    return objects


def bash_script(container):
    """The script of a container run as bash -c SCRIPT, checked by bash's parser."""
    assert container.command == ["bash", "-c"] and len(container.args) == 1
    checked = subprocess.run(["bash", "-n", "-c", container.args[0]], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    return container.args[0]


def option(command, name):
    return re.search(rf"{name}=(\S+)", command)[1]


def test_the_kubernetes_training_job_runs_one_torchrun_per_pod_meeting_at_pod_0(monkeypatch):
    service, job = kubernetes_objects("train_k8s.yaml")
    assert [type(service).__name__, type(job).__name__] == ["V1Service", "V1Job"]
    assert service.spec.cluster_ip == "None" and service.spec.selector == {"job-name": job.metadata.name}
    spec, pod = job.spec, job.spec.template.spec
    assert spec.completion_mode == "Indexed" and pod.subdomain == service.metadata.name
    (container,) = pod.containers
    script = bash_script(container)
    assert spec.completions == spec.parallelism == int(option(script, "--nnodes"))
    assert option(script, "--nproc-per-node") == container.resources.limits["nvidia.com/gpu"]
    assert option(script, "--rdzv-endpoint") == f"{job.metadata.name}-0.{service.metadata.name}:29400"
    # restarts: the container in place, and a group whose process failed; each resumes
    assert pod.restart_policy == "OnFailure" and spec.backoff_limit > 0 and int(option(script, "--max-restarts")) > 0
    environment = {variable.name: variable.value for variable in container.env}
    assert f'if [ -f "$OUT_DIR/{MANIFEST_FILE}" ]; then resume=--init_from=resume; fi' in script
    assert 'train.py $TRAIN_ARGS --out_dir="$OUT_DIR" $resume' in script
    mounts = {mount.name: mount.mount_path for mount in container.volume_mounts}
    claims = {volume.name for volume in pod.volumes if volume.persistent_volume_claim}
    assert [name for name in claims if mounts[name] == "/shared"] and environment["OUT_DIR"].startswith("/shared/")
    monkeypatch.chdir(ROOT)  # the config file, as the container's workingDir has it
    cfg = train.read_config([*shlex.split(environment["TRAIN_ARGS"]), f"--out_dir={environment['OUT_DIR']}"])
    assert cfg.dataset.startswith("/shared/")


def test_the_kubernetes_prepare_jobs_filter_in_one_pod_per_task_then_merge_with_flags_prepare_accepts():
    config_map, filter_job, merge_job = kubernetes_objects("prepare_k8s.yaml")
    flags = shlex.split(config_map.data["FLAGS"])
    scripts = [bash_script(job.spec.template.spec.containers[0]) for job in (filter_job, merge_job)]
    stage_one, merge = (prepare.read_settings(flags + shlex.split(script.split("$FLAGS", 1)[1])) for script in scripts)
    assert filter_job.spec.completion_mode == "Indexed" and stage_one["tasks"] == filter_job.spec.completions
    assert stage_one["task"] == -1 and not stage_one["merge"] and merge["merge"]  # the task: JOB_COMPLETION_INDEX
    assert stage_one["source"] == "commoncrawl" and stage_one["crawl"] != "latest"
    for job in (filter_job, merge_job):
        pod = job.spec.template.spec
        assert pod.containers[0].env_from[0].config_map_ref.name == config_map.metadata.name
        assert stage_one["parts"].startswith(pod.containers[0].volume_mounts[0].mount_path + "/")


# ----------------------------------------------------------------------------- SkyPilot
SKY_TASK = """
import json, sys
import sky

task = sky.Task.from_yaml(sys.argv[1])
(resources,) = task.resources
print(json.dumps({"num_nodes": task.num_nodes, "accelerators": resources.accelerators, "use_spot": resources.use_spot,
                  "workdir": task.workdir, "envs": task.envs, "setup": task.setup, "run": task.run,
                  "mounts": {path: storage.mode.value for path, storage in task.storage_mounts.items()}}))
"""


@pytest.fixture(scope="module")
def sky_task(tmp_path_factory):
    """launch/sky.yaml as SkyPilot's Task.from_yaml reads it (no cloud, no credentials; SkyPilot
    keeps its state in a HOME of its own)."""
    home = tmp_path_factory.mktemp("sky_home")
    loaded = subprocess.run([sys.executable, "-c", SKY_TASK, str(ROOT / "launch" / "sky.yaml")], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env={**os.environ, "HOME": str(home)})
    if "No module named 'sky'" in loaded.stderr:
        cannot_run_here("reading the task needs the skypilot package (pip install skypilot)")
    assert loaded.returncode == 0, loaded.stderr
    return json.loads(loaded.stdout.splitlines()[-1])


def test_the_skypilot_task_trains_on_spot_gpus_with_the_data_and_checkpoints_in_a_bucket(sky_task, monkeypatch):
    assert sky_task["num_nodes"] >= 2 and sky_task["use_spot"] and sky_task["accelerators"] == {"H100": 8}
    assert sky_task["workdir"] == "." and "pip install -r requirements.txt" in sky_task["setup"]
    checked = subprocess.run(["bash", "-n", "-c", sky_task["run"]], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # a recovered spot job runs the same script again: it resumes once out_dir holds a checkpoint
    assert f'if [ -f "$OUT_DIR/{MANIFEST_FILE}" ]; then resume=--init_from=resume; fi' in sky_task["run"]
    assert 'train.py $TRAIN_ARGS --dataset="$DATASET" --out_dir="$OUT_DIR" $resume' in sky_task["run"]
    for variable in ("NUM_NODES", "NUM_GPUS_PER_NODE", "NODE_RANK", "NODE_IPS"):  # what SkyPilot sets on each node
        assert f"$SKYPILOT_{variable}" in sky_task["run"]
    (bucket, mode), = sky_task["mounts"].items()
    assert mode == "MOUNT_CACHED"
    envs = sky_task["envs"]
    assert envs["DATASET"].startswith(bucket + "/") and envs["OUT_DIR"].startswith(bucket + "/")
    assert prepare.read_settings(shlex.split(envs["PREPARE_ARGS"]))["source"] == "commoncrawl"
    monkeypatch.chdir(ROOT)
    train.read_config([*shlex.split(envs["TRAIN_ARGS"]), f"--dataset={envs['DATASET']}", f"--out_dir={envs['OUT_DIR']}"])
