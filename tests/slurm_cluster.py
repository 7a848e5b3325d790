"""A real one-node Slurm cluster in a folder, for the tests of launch/'s Slurm files.

munged runs with a key, socket and pid file of its own (a system munged, if any, is left
alone); slurmctld and slurmd run as root in the foreground, children of the test process,
with SLURM_CONF pointing at the folder's slurm.conf, their own state, spool and log folders
and free ports. Every pytest-xdist worker that needs one starts its own, so two never share a
port, a folder or a queue, and each runs its jobs beside the other worker's tests, as any
other test does. Needs Debian's slurm-wlm and munge packages (Slurm 22.05), and root.

    cluster = SlurmCluster(folder)    # started; cluster.stop() cancels every job and ends it
    job = cluster.submit("launch/train_slurm.sbatch", "--max_iters=10", options=["--ntasks=2"], cwd=clone)
    cluster.wait_for_end(job)         # {"7": ("COMPLETED", "None")}: each job's state and reason
"""
import fcntl
import getpass
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch")
NODE = "localhost"  # resolves everywhere, as a real cluster's node names do on its nodes
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
# A requeued job waits cred_expire + 1 seconds before it may start again (Slurm's job_mgr.c,
# batch_requeue_fini; slurm.conf(5), AuthInfo): 120 by default, long enough for a job step's
# credentials to reach a loaded node. 10 keeps a requeue test short on this one node, and so do
# scheduling passes every second (the main one runs every 60 s by default, backfill every 30 s:
# once eligible again, a requeued job waits for the next pass).
CRED_EXPIRE = 10

SLURM_CONF = """\
ClusterName=owngpt
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerParameters=sched_interval=1,bf_interval=1
DefMemPerCPU={memory_per_cpu}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=30
MinJobAge=3600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=main Nodes={node} Default=YES MaxTime=INFINITE State=UP
# a partition whose time limit no launch file's job fits in
PartitionName=short Nodes={node} MaxTime=00:01:00 State=UP
"""


def missing_machinery():
    """Why a cluster cannot start here, or None."""
    absent = [name for name in PROGRAMS if shutil.which(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmctld and slurmd run as root here, and this is not root"
    return None


def free_ports(count):
    """Ports nothing listens on, below the kernel's ephemeral range (which a process asking
    for any free port, torchrun --standalone's included, is given from)."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = []
    for port in random.sample(range(first_ephemeral - 2000, first_ephemeral), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports below {first_ephemeral}")


class SlurmCluster:
    def __init__(self, folder):
        self.folder = Path(folder)
        for name in ("munge", "state", "spool", "log"):
            (self.folder / name).mkdir(mode=0o700, parents=True)
        self.conf = self.folder / "slurm.conf"
        # jobs inherit the submitter's environment: the conf, this Python first on PATH
        # (python and torchrun in the launch files), one thread per process
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "OMP_NUM_THREADS": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.daemons = []
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = self.folder / "munge"
        self._daemon("munged", "--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                     f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                     f"--log-file={munge}/munged.log")
        self._wait(lambda: (munge / "munge.socket").exists(), "munged's socket")
        cpus = os.cpu_count()
        # less than slurmd finds: a node with less memory than slurm.conf says is drained
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20 * 9 // 10
        # ports are chosen and taken under one lock, so that clusters started at once (two
        # pytest-xdist workers, two checkouts' test runs) never choose the same ones
        with open(Path(tempfile.gettempdir()) / "owngpt-slurm-ports.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ctld_port, slurmd_port = free_ports(2)
            self.conf.write_text(SLURM_CONF.format(
                node=NODE, folder=self.folder, ctld_port=ctld_port, slurmd_port=slurmd_port, cpus=cpus,
                memory=memory, memory_per_cpu=memory // cpus, cred_expire=CRED_EXPIRE))
            self._daemon("slurmctld", "-D", "-i")
            self._daemon("slurmd", "-D", "-N", NODE)
            self._wait(lambda: self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).strip() == "idle",
                       "the node to be idle")

    def _daemon(self, *command):
        log = open(self.folder / "log" / f"{command[0]}.out", "w")
        self.daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        log.close()

    def _wait(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[0]} exited with {daemon.returncode} while waiting for {what}: "
                                       f"see {self.folder / 'log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout} s: see {self.folder / 'log'}")
            time.sleep(0.1)

    def run(self, *command, check=True, env=None):
        """A Slurm command against this cluster; its standard output."""
        result = subprocess.run(command, capture_output=True, text=True, env={**self.env, **(env or {})},
                                cwd=self.folder, timeout=120)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def submit(self, script, *arguments, options=(), cwd):
        """sbatch [options] script arguments, from cwd; the job id."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script), *arguments], capture_output=True,
                                text=True, env=self.env, cwd=cwd, timeout=120)
        assert result.returncode == 0, f"sbatch failed:\n{result.stderr}"
        return result.stdout.strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job`'s fields of one job (or of an array's task, JOBID_INDEX)."""
        text = self.run("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def states(self, job_id):
        """{job id as squeue prints it (an array's tasks as JOBID_INDEX): (state, reason)}."""
        lines = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T %r").splitlines()
        return {job: (state, reason) for job, state, reason in (line.split(" ", 2) for line in lines)}

    def wait_for_end(self, job_id):
        """Waits until the job (every task of an array) has ended; its states()."""
        self._wait(lambda: all(state in ENDED for state, _ in self.states(job_id).values()), f"the end of job {job_id}",
                   timeout=600)
        return self.states(job_id)

    def stop(self):
        """Cancels every job, waits for their processes to end, and stops the daemons."""
        try:
            if len(self.daemons) == 3:
                self.run("scancel", f"--user={getpass.getuser()}", check=False)
                self._wait(lambda: not self.run("squeue", "-h", check=False).strip(), "every job to end")
        finally:
            for daemon in reversed(self.daemons):
                daemon.terminate()
                daemon.wait(timeout=60)
