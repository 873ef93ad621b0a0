"""Scale-out for real: two workers on one study in a PostgreSQL server started here on loopback,
and a two-worker Ray run on a local Ray instance. Neither loses a trial nor runs one twice,
and neither leaves a process behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from pared.search import SearchSpec
from pared.search.output import write_outputs
from pared.search.study import load_study, open_storage, prepare

WORKER = Path(__file__).parent / "search_synthetic.py"
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root (CI runs as root): use its own system user then.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_url():
    if not PG_BINS:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="pip install 'pared[search]' (psycopg, the driver SQLAlchemy 2.1 uses)")
    bindir = PG_BINS[-1].parent
    root = Path(tempfile.mkdtemp(prefix="pared-pg-"))
    os.chmod(root, 0o777)  # the postgres user writes its data and socket here
    data, port = root / "data", _free_port()
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "pared", "-A", "trust", "--no-sync"]),
                   check=True, capture_output=True)
    opts = f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections=50"
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql://pared@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _check_each_trial_ran_once(spec: SearchSpec, calls: int) -> list[dict]:
    budget = spec.trials
    study = load_study(spec, open_storage(spec, fresh=False, overwrite=False))
    trials = study.get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]  # none lost mid-way
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(numbers)))
    # one evaluation per trial that got a recipe: nothing ran twice, nothing was skipped
    assert calls == sum("recipe" in t.user_attrs for t in trials)
    # two workers may both start a last trial: at most one over the budget
    assert budget <= len(trials) <= budget + 1
    return [dict(t.user_attrs, number=t.number) for t in trials]


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    out = tmp_path / "pg"
    cmd = [sys.executable, str(WORKER), str(out), "--storage", postgres_url, "--join", "--trials", "8", "--sleep", "0.5"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()[-2000:]
    calls = sum(json.loads(o.decode().strip().splitlines()[-1])["calls"] for o, _ in results)
    spec = SearchSpec(model="digits", out=str(out), trials=8, constraints=("metric_drop <= 2",), storage=postgres_url)
    rows = _check_each_trial_ran_once(spec, calls)
    workers = {r["worker"] for r in rows if "worker" in r}
    assert len(workers) == 2, workers  # both processes took trials from the shared study
    assert json.loads((out / "search.json").read_text())["trials"]


def test_two_ray_workers_finish_a_real_digits_study(tmp_path):
    ray = pytest.importorskip("ray", reason="pip install 'pared[search]' (ray)")
    from pared.search.ray_backend import run_on_ray

    spec = SearchSpec(model="digits", out=str(tmp_path / "ray"), trials=4, techniques=("int8",), runtime="torch",
                      rounds=2, batch=4, threads=1, sensitivity=False, constraints=("metric_drop <= 2",))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    study = prepare(spec)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        per_worker = run_on_ray(spec, 2)
    finally:
        ray.shutdown()
    doc = write_outputs(study, Path(spec.out))
    assert len(per_worker) == 2 and all(n >= 1 for n in per_worker), per_worker
    rows = _check_each_trial_ran_once(spec, sum(per_worker))
    assert len({r["worker"] for r in rows if "worker" in r}) == 2
    assert any(t["state"] == "COMPLETE" and t["metrics"]["accuracy"] > 90 for t in doc["trials"])
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.name() for p in left]
