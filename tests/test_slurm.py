"""The sbatch scripts of examples/slurm: shell syntax, shellcheck, and real runs under a fake SLURM.

The fake SLURM (below) replaces `sbatch`, `srun` and `scontrol` with small local launchers put first on PATH:
  sbatch   reads the script's `#SBATCH` directives, lets command-line options override them (as sbatch does), sets
           the SLURM_* job variables, runs the script with bash and waits for it (like `sbatch --wait`), with its
           output in the --output file (%x, %j expanded). Unknown options are errors, so a typo in a directive
           fails the test. The batch shell's pid goes to <state>/batch.pid (to deliver `--signal=B:` signals).
  srun     starts N local processes (N from --ntasks, --ntasks-per-node x --nodes, or SLURM_NTASKS) with
           SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURM_STEP_* set, prefixes lines with the task id under
           --label, forwards SIGUSR1/SIGUSR2/SIGTERM/SIGINT to every task, and returns the highest exit status.
           Each call is appended to <state>/srun.log as JSON (pyxis --container-* options are recorded, not run).
  scontrol `show hostnames` (one line per node) and `requeue <job>` (appended to <state>/requeue.log).
The scripts then launch either the real trainer on 2 CPU ranks (the launch path end to end) or, for the signal
tests, a stand-in trainer that records its rank, arguments and the signals it receives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))
TRAIN_SCRIPTS = ["train.sbatch", "train_multinode.sbatch", "train_torchrun.sbatch"]

# ---------------------------------------------------------------------------------------------------------------
# fake SLURM

_COMMON = r'''
import json, os, re, shlex, signal, subprocess, sys, threading
STATE = os.environ["FAKE_SLURM_STATE"]

def parse_opts(argv, spec):
    """Parse leading slurm options (long --a=b / --a b / flags, short -x v) until the first non-option."""
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
        else:
            name, eq, val = a[1:2], "", a[2:]
            eq = "=" if val else ""
        name = spec["alias"].get(name, name)
        if name in spec["flags"]:
            opts[name] = val if eq else True
        elif name in spec["values"]:
            if not eq:
                i += 1
                val = argv[i]
            opts[name] = val
        else:
            sys.exit(f"fake {spec['prog']}: unrecognized option {a!r}")
        i += 1
    return opts, argv[i:]
'''

_SBATCH = _COMMON + r'''
SPEC = dict(prog="sbatch", alias={"J": "job-name", "N": "nodes", "n": "ntasks", "c": "cpus-per-task", "t": "time",
                                  "o": "output", "A": "account", "p": "partition", "q": "qos"},
            flags={"requeue", "exclusive"},
            values={"job-name", "nodes", "ntasks", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time",
                    "output", "open-mode", "signal", "account", "partition", "qos", "mem"})

def directives(script):
    out = []
    for line in open(script):
        s = line.strip()
        if s.startswith("#SBATCH"):
            out += shlex.split(s[len("#SBATCH"):])
        elif s and not s.startswith("#"):
            break  # sbatch stops reading directives at the first command
    return out

cli, rest = parse_opts(sys.argv[1:], SPEC)
if not rest:
    sys.exit("fake sbatch: no batch script given")
script, args = rest[0], rest[1:]
opts, leftover = parse_opts(directives(script), SPEC)
if leftover:
    sys.exit(f"fake sbatch: bad #SBATCH line near {leftover!r}")
opts.update(cli)
if "signal" in opts and not re.fullmatch(r"(B:)?(USR1|USR2|TERM|INT)@\d+", opts["signal"]):
    sys.exit(f"fake sbatch: bad --signal {opts['signal']!r}")
if "time" in opts and not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", opts["time"]):
    sys.exit(f"fake sbatch: bad --time {opts['time']!r}")
if opts.get("open-mode", "truncate") not in ("append", "truncate"):
    sys.exit(f"fake sbatch: bad --open-mode {opts['open-mode']!r}")
nodes = int(opts.get("nodes", 1))
per_node = int(opts.get("ntasks-per-node", 1))
ntasks = int(opts.get("ntasks", nodes * per_node))
job_id = os.environ.get("FAKE_SLURM_JOB_ID", "4242")
name = opts.get("job-name", os.path.basename(script))
env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_JOB_NAME=name, SLURM_NNODES=str(nodes),
           SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(per_node),
           SLURM_CPUS_PER_TASK=opts.get("cpus-per-task", "1"), SLURM_JOB_NODELIST="localhost",
           SLURM_NODELIST="localhost", SLURM_SUBMIT_DIR=os.getcwd(), SLURM_GPUS_ON_NODE=opts.get("gpus-per-node", "0"),
           SLURM_RESTART_COUNT=os.environ.get("FAKE_SLURM_RESTART_COUNT", "0"))
for k in ("account", "partition", "qos"):
    if k in opts:
        env[f"SLURM_JOB_{k.upper()}"] = opts[k]
output = opts.get("output", "slurm-%j.out").replace("%j", job_id).replace("%x", name)
if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    sys.exit(f"fake sbatch: the directory of --output {output!r} does not exist (real SLURM would lose the log)")
print(f"Submitted batch job {job_id}", flush=True)
with open(output, "a" if opts.get("open-mode") == "append" else "w") as log:
    proc = subprocess.Popen(["bash", script, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(STATE, "batch.pid"), "w") as f:
        f.write(str(proc.pid))
    sys.exit(proc.wait())
'''

_SRUN = _COMMON + r'''
SPEC = dict(prog="srun", alias={"n": "ntasks", "N": "nodes", "l": "label", "K": "kill-on-bad-exit"},
            flags={"label", "kill-on-bad-exit", "overlap"},
            values={"ntasks", "nodes", "ntasks-per-node", "container-image", "container-mounts",
                    "container-workdir", "cpu-bind", "gpus-per-node", "export"})
opts, cmd = parse_opts(sys.argv[1:], SPEC)
with open(os.path.join(STATE, "srun.log"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "opts": opts, "cmd": cmd}) + "\n")
if not cmd:
    sys.exit("fake srun: no command")
nodes = int(opts.get("nodes", os.environ.get("SLURM_NNODES", 1)))
if "ntasks" in opts:
    ntasks = int(opts["ntasks"])
elif "ntasks-per-node" in opts:
    ntasks = int(opts["ntasks-per-node"]) * nodes
else:
    ntasks = int(os.environ.get("SLURM_NTASKS", 1))
procs = []
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
               SLURM_NTASKS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NODELIST="localhost",
               SLURM_STEPID="0")
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if opts.get("label") else None,
                                  stderr=subprocess.STDOUT if opts.get("label") else None))

def pump(rank, p):
    for line in iter(p.stdout.readline, b""):
        sys.stdout.write(f"{rank}: {line.decode(errors='replace')}")
        sys.stdout.flush()

threads = [threading.Thread(target=pump, args=(r, p), daemon=True) for r, p in enumerate(procs) if p.stdout]
for t in threads:
    t.start()

def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)

for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
status = 0
pending = set(range(ntasks))
while pending:
    for r in list(pending):
        try:
            rc = procs[r].wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            continue
        pending.discard(r)
        rc = 128 - rc if rc < 0 else rc
        status = max(status, rc)
        if rc and opts.get("kill-on-bad-exit"):
            forward(signal.SIGTERM, None)
for t in threads:
    t.join()
sys.exit(status)
'''

_SCONTROL = _COMMON + r'''
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    nodelist = args[2] if len(args) > 2 else os.environ["SLURM_JOB_NODELIST"]
    print("\n".join(nodelist.split(",")))
elif args[:1] == ["requeue"] and len(args) == 2:
    with open(os.path.join(STATE, "requeue.log"), "a") as f:
        f.write(args[1] + "\n")
else:
    sys.exit(f"fake scontrol: unsupported {args}")
'''


def install_fake_slurm(bin_dir: Path, state_dir: Path) -> dict:
    """Write the fake commands; return the environment additions (PATH first, FAKE_SLURM_STATE)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", _SBATCH), ("srun", _SRUN), ("scontrol", _SCONTROL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    python_bin = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}{os.pathsep}{python_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_SLURM_STATE": str(state_dir)}


# A trainer stand-in for the signal tests: records rank, arguments and environment, then waits for a signal.
_STAND_IN_TRAINER = r"""
import json, os, signal, sys, time
rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "-1")))
state = os.environ["FAKE_SLURM_STATE"]
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda signum, frame: got.append(signal.Signals(signum).name))
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
        "SLURM_LOCALID", "SLURM_JOB_ID", "OMP_NUM_THREADS")
with open(os.path.join(state, f"rank{rank}.ready"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
deadline = time.time() + 120  # a safety net only: the test signals within seconds
while not got and time.time() < deadline:
    time.sleep(0.05)
with open(os.path.join(state, f"rank{rank}.signals"), "w") as f:
    json.dump(got, f)
print(f"stand-in trainer rank {rank} got {got}", flush=True)
sys.exit(0 if got else 3)
"""

# Records each call (arguments and rank) and succeeds: stands in for python / megatron-papo in convert / evaluate.
_RECORDER = r"""
import json, os, sys
with open(os.path.join(os.environ["FAKE_SLURM_STATE"], "calls.log"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "rank": os.environ.get("SLURM_PROCID")}) + "\n")
"""


def _executable(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    """A tmp directory with the fake SLURM installed; submits the repository's scripts from the repository root."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = tmp / "state"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.env.update(install_fake_slurm(tmp / "bin", self.state))
        self.env.update(MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.job_id = "4242"

    def submit(self, script: str, sbatch_opts=(), job_args=(), **env) -> subprocess.Popen:
        cmd = ["sbatch", f"--output={self.logs}/%x-%j.out", *sbatch_opts, str(SLURM_DIR / script), *job_args]
        return subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def finish(self, proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"job did not finish within {timeout} s; log:\n{self.job_log()[-4000:]}")
        return proc.returncode, out

    def job_log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logs.glob("*.out")))

    def wait_for_ranks(self, n: int, proc: subprocess.Popen, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = sorted(self.state.glob("rank*.ready"))
            if len(ready) == n:
                time.sleep(0.3)  # let the stand-ins install their handlers' wait loop
                return [json.loads(p.read_text()) for p in ready]
            if proc.poll() is not None:
                pytest.fail(f"job ended before {n} ranks started:\n{self.job_log()[-4000:]}")
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{n} ranks did not start; log:\n{self.job_log()[-4000:]}")

    def signal_batch_shell(self, sig: signal.Signals) -> None:
        os.kill(int((self.state / "batch.pid").read_text()), sig)  # what `--signal=B:...` does

    def signals_received(self) -> dict[int, list[str]]:
        return {int(p.name[4:].split(".")[0]): json.loads(p.read_text())
                for p in self.state.glob("rank*.signals")}

    def requeued(self) -> list[str]:
        path = self.state / "requeue.log"
        return path.read_text().split() if path.exists() else []

    def srun_calls(self) -> list[dict]:
        return [json.loads(line) for line in (self.state / "srun.log").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck)")
def test_scripts_pass_shellcheck():
    # -x follows `source examples/slurm/common.sh` (paths resolve from the repository root, as in the jobs).
    proc = subprocess.run(["shellcheck", "-x", "--severity=style", *[str(p.relative_to(ROOT)) for p in SCRIPTS]],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_training_scripts_are_preemption_safe(script):
    text = (SLURM_DIR / script).read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append",
                      "#SBATCH --output=logs/%x-%j.out"):
        assert directive in text, f"{script}: missing {directive}"
    assert "--resume auto" in text


def test_scripts_hold_no_site_values():
    """Site values are variables; the scripts name no absolute path, account or partition of their own."""
    for script in SCRIPTS:
        for n, line in enumerate(script.read_text().splitlines(), 1):
            if n == 1 or line.lstrip().startswith("#") and not line.startswith("#SBATCH"):
                continue
            assert "/home/" not in line and "/scratch" not in line and "/lustre" not in line, (script.name, n)
            assert not line.startswith(("#SBATCH --account", "#SBATCH --partition", "#SBATCH -A", "#SBATCH -p")), \
                (script.name, n, "account/partition belong in sbatch -A/-p, SBATCH_* or submit.sh")


# ---------------------------------------------------------------------------------------------------------------
# launch paths with the stand-in trainer (signals, requeue, container flags, argument plumbing)


@pytest.mark.parametrize("sig,requeue", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["USR1", "TERM"])
def test_srun_script_forwards_signal_and_requeues_on_usr1(tmp_path, sig, requeue):
    cluster = FakeCluster(tmp_path)
    trainer = _executable(tmp_path / "trainer", _STAND_IN_TRAINER)
    proc = cluster.submit("train.sbatch", ["--ntasks-per-node=2", "--gpus-per-node=0"],
                          ["--set", "training.rl_steps=3"], MEGATRON_PAPO_CMD=trainer,
                          CONFIG="examples/tiny_cpu.yaml", RUN_DIR=str(tmp_path / "run"),
                          CONTAINER_IMAGE="registry.example/megatron-papo.sqsh")
    ranks = cluster.wait_for_ranks(2, proc)
    cluster.signal_batch_shell(sig)
    rc, out = cluster.finish(proc, timeout=120)
    log = cluster.job_log()
    assert rc == 0, log
    assert f"Submitted batch job {cluster.job_id}" in out
    assert cluster.signals_received() == {0: [sig.name], 1: [sig.name]}, log
    assert cluster.requeued() == ([cluster.job_id] if requeue else []), log
    # ranks and rendezvous as the platform layer reads them
    assert sorted(r["env"]["SLURM_PROCID"] for r in ranks) == ["0", "1"]
    assert {r["env"]["SLURM_NTASKS"] for r in ranks} == {"2"}
    assert {r["env"]["MASTER_ADDR"] for r in ranks} == {"localhost"}
    assert {r["env"]["MASTER_PORT"] for r in ranks} == {cluster.env["MASTER_PORT"]}
    run = tmp_path / "run"
    assert ranks[0]["argv"] == ["train", "--config", "examples/tiny_cpu.yaml", "--resume", "auto",
                                "--set", f"checkpoint.dir={run}/checkpoints",
                                "--set", f"logging.tensorboard_dir={run}/tensorboard",
                                "--set", "training.rl_steps=3"]
    (call,) = cluster.srun_calls()
    assert call["opts"]["container-image"] == "registry.example/megatron-papo.sqsh"
    assert call["opts"]["container-mounts"] == f"{ROOT}:{ROOT}"
    assert call["opts"]["container-workdir"] == str(ROOT)
    assert "0: stand-in trainer rank 0" in log and "1: stand-in trainer rank 1" in log  # srun --label
    assert f"job {cluster.job_id} (papo) start 1" in log


def test_torchrun_script_turns_usr1_into_term_and_requeues(tmp_path):
    cluster = FakeCluster(tmp_path)
    trainer = _executable(tmp_path / "trainer", _STAND_IN_TRAINER)
    proc = cluster.submit("train_torchrun.sbatch", ["--nodes=1", "--gpus-per-node=2"], [],
                          MEGATRON_PAPO_CMD=trainer, CONFIG="examples/tiny_cpu.yaml")
    ranks = cluster.wait_for_ranks(2, proc)
    cluster.signal_batch_shell(signal.SIGUSR1)
    cluster.finish(proc, timeout=120)  # torchrun exits non-zero after a signal; the requeue is what matters
    log = cluster.job_log()
    assert cluster.signals_received() == {0: ["SIGTERM"], 1: ["SIGTERM"]}, log
    assert cluster.requeued() == [cluster.job_id], log
    assert sorted(r["env"]["RANK"] for r in ranks) == ["0", "1"]
    assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"2"}
    (call,) = cluster.srun_calls()
    assert call["opts"]["ntasks-per-node"] == "1"
    assert f"--rdzv-endpoint=localhost:{cluster.env['MASTER_PORT']}" in call["cmd"]


def test_convert_script_runs_conversion_then_verification(tmp_path):
    cluster = FakeCluster(tmp_path)
    recorder = _executable(tmp_path / "recorder", _RECORDER)
    proc = cluster.submit("convert.sbatch", [], [], PYTHON=recorder, DIRECTION="hf-to-mcore", HF_DIR="hf/7b",
                          MCORE_DIR="mcore/7b", TP="2", PP="1")
    rc, _ = cluster.finish(proc, timeout=60)
    assert rc == 0, cluster.job_log()
    calls = [json.loads(line)["argv"] for line in (cluster.state / "calls.log").read_text().splitlines()]
    assert calls == [["tools/convert_checkpoint.py", "hf-to-mcore", "--hf", "hf/7b", "--out", "mcore/7b",
                      "--tp", "2", "--pp", "1"],
                     ["tools/verify_conversion.py", "--hf", "hf/7b", "--mcore", "mcore/7b"]]
    bad = cluster.submit("convert.sbatch", [], [], PYTHON=recorder, DIRECTION="sideways")
    assert cluster.finish(bad, timeout=60)[0] == 2


def test_evaluate_script_passes_checkpoint_data_and_k(tmp_path):
    cluster = FakeCluster(tmp_path)
    recorder = _executable(tmp_path / "recorder", _RECORDER)
    proc = cluster.submit("evaluate.sbatch", ["--ntasks-per-node=2"], ["--limit", "5"], MEGATRON_PAPO_CMD=recorder,
                          CHECKPOINT="runs/x/checkpoints/step_2", EVAL_SHARDS="data/eval")
    rc, _ = cluster.finish(proc, timeout=60)
    assert rc == 0, cluster.job_log()
    calls = [json.loads(line) for line in (cluster.state / "calls.log").read_text().splitlines()]
    assert sorted(c["rank"] for c in calls) == ["0", "1"]
    assert calls[0]["argv"] == ["evaluate", "--checkpoint", "runs/x/checkpoints/step_2", "--data", "data/eval",
                                "--k", "8", "--out", "runs/x/checkpoints/step_2/eval_avg@8.json", "--limit", "5"]


# ---------------------------------------------------------------------------------------------------------------
# the real trainer, launched by the real single-node script, on 2 CPU ranks


def _trainer_entry_missing() -> str | None:
    if importlib.util.find_spec("megatron_papo.training.entry") is None:
        return "trainer entry point megatron_papo.training.entry is missing (training helper has not landed it)"
    return None


def _newest_step(ckpt_dir: Path) -> int:
    steps = [int(p.name[5:]) for p in ckpt_dir.glob("step_*")
             if p.name[5:].isdigit() and (p / "metadata.json").exists()]     # not a step_N.tmp being written
    return max(steps, default=0)


@pytest.mark.skipif(_trainer_entry_missing() is not None, reason=str(_trainer_entry_missing()))
def test_single_node_script_real_trainer_steps_is_preempted_and_resumes(tmp_path):
    """train.sbatch starts the real trainer on 2 CPU ranks; it completes RL steps (saving each), takes the
    pre-emption signal, saves and exits, the job requeues; the requeued start continues from that checkpoint."""
    cluster = FakeCluster(tmp_path)
    run, shards = tmp_path / "run", tmp_path / "data" / "train"
    ckpt = run / "checkpoints"
    env = dict(CONFIG="examples/tiny_cpu.yaml", RUN_DIR=str(run), TRAIN_SHARDS=str(shards))
    proc = cluster.submit("train.sbatch", ["--ntasks-per-node=2", "--gpus-per-node=0"],
                          ["--set", "training.rl_steps=200", "--set", "checkpoint.save_interval=1"], **env)
    deadline = time.monotonic() + 300
    while _newest_step(ckpt) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _newest_step(ckpt) >= 1, f"no RL step completed; log:\n{cluster.job_log()[-6000:]}"
    cluster.signal_batch_shell(signal.SIGUSR1)
    rc, _ = cluster.finish(proc, timeout=300)
    log = cluster.job_log()
    stopped_at = _newest_step(ckpt)
    assert rc == 0, log[-6000:]
    assert 1 <= stopped_at < 200, (stopped_at, log[-6000:])   # it stopped early, on the signal, with a checkpoint
    assert cluster.requeued() == [cluster.job_id], log[-6000:]
    assert "0: " in log and "1: " in log                        # both ranks ran under srun --label
    resolved = json.loads((ckpt / "config.json").read_text())    # --set plumbing reached the trainer
    assert resolved["data"]["train_shards"] == str(shards) and resolved["model"]["preset"] == "tiny"

    # The requeued start (same script, --resume auto) continues from step `stopped_at`: the earlier checkpoint is
    # left untouched and exactly one more step is written.
    before = (ckpt / f"step_{stopped_at}" / "metadata.json").stat().st_mtime_ns
    proc = cluster.submit("train.sbatch", ["--ntasks-per-node=2", "--gpus-per-node=0"],
                          ["--set", f"training.rl_steps={stopped_at + 1}", "--set", "checkpoint.save_interval=1"],
                          FAKE_SLURM_RESTART_COUNT="1", **env)
    rc, _ = cluster.finish(proc, timeout=300)
    log = cluster.job_log()
    assert rc == 0, log[-6000:]
    assert _newest_step(ckpt) == stopped_at + 1, log[-6000:]
    assert (ckpt / f"step_{stopped_at}" / "metadata.json").stat().st_mtime_ns == before, "it restarted from scratch"
    assert f"job {cluster.job_id} (papo) start 2" in log
    assert cluster.requeued() == [cluster.job_id]                # a normal finish does not requeue
