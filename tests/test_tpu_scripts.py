"""tpu/*.sh: the gcloud commands printed by --dry-run, the flag errors, and the shell the workers run
(executed here in a scratch $HOME with a stand-in python, so its quoting and pid/log handling are
exercised, not just read)."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SLICE = ["--project", "my-proj", "--zone", "us-east5-a", "--name", "orz-7b"]


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "ORZ_"))}
    env.update(extra or {})
    return env


def run_script(name, *args, env=None, check=True):
    p = subprocess.run(["bash", str(TPU / name), *args], capture_output=True, text=True, env=_env(env),
                       timeout=60)
    if check:
        assert p.returncode == 0, f"{name} {args} failed ({p.returncode}): {p.stderr}"
    return p


def commands(stdout):
    """The printed command lines (comments dropped), each split as a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def remote_command(argv):
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command="):]


def test_create_queued_resource():
    p = run_script("create.sh", *SLICE, "--accelerator-type", "v5p-128", "--spot", "--dry-run")
    (cmd,) = commands(p.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "orz-7b-qr"]
    for flag in ["--node-id=orz-7b", "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-128",
                 "--runtime-version=v2-alpha-tpuv5", "--spot"]:
        assert flag in cmd


@pytest.mark.parametrize("acc,runtime", [("v6e-8", "v2-alpha-tpuv6e"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                         ("v4-32", "tpu-ubuntu2204-base")])
def test_create_default_runtime_per_generation(acc, runtime):
    (cmd,) = commands(run_script("create.sh", *SLICE, "--accelerator-type", acc, "--dry-run").stdout)
    assert f"--runtime-version={runtime}" in cmd and f"--accelerator-type={acc}" in cmd


def test_create_best_effort_uses_alpha_and_settings_from_env():
    env = {"TPU_PROJECT": "p2", "TPU_ZONE": "europe-west4-b", "TPU_NAME": "n2", "TPU_ACCELERATOR_TYPE": "v6e-8",
           "TPU_RUNTIME_VERSION": "custom-rt"}
    p = run_script("create.sh", "--best-effort", "--qr-id", "q9", "--wait", "--dry-run", "--", "--network=vpc",
                   env=env)
    create, describe = commands(p.stdout)
    assert create[:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "q9"]
    for flag in ["--node-id=n2", "--zone=europe-west4-b", "--project=p2", "--accelerator-type=v6e-8",
                 "--runtime-version=custom-rt", "--best-effort", "--network=vpc"]:
        assert flag in create
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "q9"]


@pytest.mark.parametrize("drop,message", [
    ("--zone", "missing --zone (or set TPU_ZONE)"),
    ("--project", "missing --project (or set TPU_PROJECT)"),
    ("--name", "missing --name (or set TPU_NAME)"),
])
def test_missing_required_flag(drop, message):
    args = list(SLICE)
    i = args.index(drop)
    del args[i:i + 2]
    p = run_script("create.sh", *args, "--accelerator-type", "v5p-8", "--dry-run", check=False)
    assert p.returncode == 2 and message in p.stderr and p.stdout == ""


def test_flag_errors():
    p = run_script("create.sh", *SLICE, "--dry-run", check=False)
    assert p.returncode == 2 and "missing --accelerator-type (or set TPU_ACCELERATOR_TYPE)" in p.stderr
    p = run_script("launch.sh", *SLICE, "--dry-run", check=False)
    assert p.returncode == 2 and "missing --config (or set ORZ_CONFIG)" in p.stderr
    p = run_script("create.sh", *SLICE, "--accelerator-type", "v5p-8", "--bogus", check=False)
    assert p.returncode == 2 and "unknown argument '--bogus'" in p.stderr
    p = run_script("create.sh", "--zone", check=False)
    assert p.returncode == 2 and "--zone needs a value" in p.stderr
    p = run_script("create.sh", *SLICE, "--accelerator-type", "v5p-8", "--spot", "--reserved", check=False)
    assert p.returncode == 2 and "at most one of" in p.stderr


def test_help():
    p = run_script("launch.sh", "--help")
    assert "orz_jax.launch" in p.stdout and "source" not in p.stdout


def test_setup_copies_and_installs_on_all_workers():
    p = run_script("setup.sh", *SLICE, "--dry-run")
    archive, scp, ssh = commands(p.stdout)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert archive[:4] == ["git", "-C", str(ROOT), "archive"] and archive[-1] == head
    tarball = [a for a in archive if a.startswith("--output=")][0][len("--output="):]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
    assert "--worker=all" in scp and "--zone=us-east5-a" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "orz-7b"] and "--worker=all" in ssh
    remote = remote_command(ssh)
    assert "pip install --python $HOME/orz_venv/bin/python -e '.[tpu]'" in remote
    assert f"echo {head} > $HOME/orz_jax/COMMIT" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_setup_git_clone_mode():
    p = run_script("setup.sh", *SLICE, "--repo", "https://github.com/me/orz_jax.git", "--ref", "v1",
                   "--system-python", "--dry-run")
    (ssh,) = commands(p.stdout)
    remote = remote_command(ssh)
    assert "--worker=all" in ssh
    assert "git clone --quiet https://github.com/me/orz_jax.git $HOME/orz_jax" in remote
    assert "checkout --quiet v1" in remote
    assert "python3 -m pip install --user -e '.[tpu]'" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_launch_command():
    p = run_script("launch.sh", *SLICE, "--config", "configs/orz_7b.yaml", "--run-name", "r1", "--dry-run",
                   "--", "ppo.actor.lr=2e-6", "experiment.name=a b")
    (ssh,) = commands(p.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "orz-7b"]
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh and "--project=my-proj" in ssh
    remote = remote_command(ssh)
    assert "-m orz_jax.launch --config configs/orz_7b.yaml ppo.actor.lr=2e-6 'experiment.name=a b'" in remote
    assert "$HOME/orz_runs/r1/worker-$W.log" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)


def _fake_worker(tmp_path, python_body):
    """A scratch $HOME holding a checkout, a venv python stand-in and a metadata `curl` stand-in."""
    home = tmp_path / "home"
    (home / "orz_jax").mkdir(parents=True)
    venv_bin = home / "orz_venv" / "bin"
    venv_bin.mkdir(parents=True)
    py = venv_bin / "python"
    py.write_text("#!/bin/bash\n" + python_body)
    py.chmod(0o755)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    curl = fakebin / "curl"
    curl.write_text("#!/bin/sh\necho 3\n")  # the metadata server's agent-worker-number
    curl.chmod(0o755)
    return home, {"HOME": str(home), "PATH": f"{fakebin}:{os.environ['PATH']}"}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_launch_and_stop_run_on_a_fake_worker(tmp_path):
    home, env = _fake_worker(tmp_path, 'echo "cwd=$PWD args=$* FOO=$FOO"\nexec sleep 30\n')
    p = run_script("launch.sh", *SLICE, "--config", "configs/x.yaml", "--run-name", "r1", "--env", "FOO=a b",
                   "--dry-run", "--", "rollout.temperature=0.7")
    remote = remote_command(commands(p.stdout)[0])
    out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    run_dir = home / "orz_runs" / "r1"
    assert (home / "orz_runs" / "latest").resolve() == run_dir.resolve()
    pid = int((run_dir / "worker-3.pid").read_text())
    assert f"worker 3: pid {pid}" in out.stdout
    try:
        log = run_dir / "worker-3.log"
        for _ in range(50):
            if log.exists() and log.read_text():
                break
            time.sleep(0.1)
        assert log.read_text().strip() == (f"cwd={home}/orz_jax args=-u -m orz_jax.launch --config configs/x.yaml "
                                           "rollout.temperature=0.7 FOO=a b")
        # a second launch refuses while the first run's process lives
        again = subprocess.run(["bash", "-c", remote.replace("/r1", "/r2")], capture_output=True, text=True,
                               env=env, timeout=30)
        assert again.returncode == 1 and "a run is still going" in again.stderr
        # stop.sh's command ends it
        stop = commands(run_script("stop.sh", *SLICE, "--grace", "5", "--dry-run").stdout)[0]
        s = subprocess.run(["bash", "-c", remote_command(stop)], capture_output=True, text=True, env=env, timeout=30)
        assert s.returncode == 0 and f"sent TERM to {pid}" in s.stdout
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_launch_foreground_streams_until_exit(tmp_path):
    home, env = _fake_worker(tmp_path, 'echo "step 1"\necho "done"\nexit 3\n')
    p = run_script("launch.sh", *SLICE, "--config", "c.yaml", "--run-name", "fg", "--foreground", "--dry-run")
    remote = remote_command(commands(p.stdout)[0])
    # Repeated: whether the training process has exited before `tail` starts is a race, and one
    # ordering once left tail waiting on an unreaped child forever.
    for _ in range(5):
        out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 3, out.stderr  # the training process's exit status
        assert "step 1\ndone" in out.stdout


def test_logs_stream_and_fetch():
    (ssh,) = commands(run_script("logs.sh", *SLICE, "--dry-run").stdout)
    assert "--worker=0" in ssh and remote_command(ssh) == "tail -n 200 -F $HOME/orz_runs/latest/worker-*.log"
    (ssh,) = commands(run_script("logs.sh", *SLICE, "--worker", "all", "--run-name", "r1", "--dry-run").stdout)
    assert "--worker=all" in ssh and "orz_runs/r1/" in remote_command(ssh)
    # v5p-128 = 64 chips = 16 hosts: one scp per worker
    cmds = commands(run_script("logs.sh", *SLICE, "--fetch", "out", "--accelerator-type", "v5p-128", "--run-name",
                               "r1", "--dry-run").stdout)
    assert cmds[0] == ["mkdir", "-p", "out/r1"]
    scps = cmds[1:]
    assert len(scps) == 16
    assert scps[15][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "orz-7b:orz_runs/r1/worker-*.log", "out/r1/"]
    assert "--worker=15" in scps[15]
    assert len(commands(run_script("logs.sh", *SLICE, "--fetch", "o", "--accelerator-type", "v6e-8",
                                   "--dry-run").stdout)) == 2  # one host
    p = run_script("logs.sh", *SLICE, "--fetch", "o", "--dry-run", check=False)
    assert p.returncode == 2 and "--num-workers" in p.stderr


def test_delete():
    (cmd,) = commands(run_script("delete.sh", *SLICE, "--dry-run").stdout)
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "orz-7b-qr", "--zone=us-east5-a",
                   "--project=my-proj", "--force", "--quiet"]


def test_scripts_are_strict():
    scripts = sorted(TPU.glob("*.sh"))
    assert {s.name for s in scripts} >= {"common.sh", "create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh",
                                         "delete.sh"}
    for script in scripts:
        assert "\nset -euo pipefail\n" in script.read_text(), script
