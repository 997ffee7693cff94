"""report_to: offline wandb and local aim runs checked from the files they leave; missing extras."""

from __future__ import annotations

import io
import sys

import pytest

from surogate.errors import UserError
from surogate.runtime.observe import EndSummary, EvalMetrics, StepMetrics, TrainingObserver
from surogate.runtime.observe.wandb_tracker import wandb_mode
from tests.observe.conftest import make_cfg, make_info


def run_five_steps(cfg, tmp_path):
    obs = TrainingObserver(cfg, None, make_info(total_steps=5), console_file=io.StringIO(), force_terminal=False)
    obs.on_start()
    for s in range(1, 6):
        obs.on_step(StepMetrics(step=s, loss=3.0 - 0.1 * s, lr=1e-4 * s, grad_norm=0.5, tokens=100))
    obs.on_eval(EvalMetrics(step=5, loss=2.7))
    outputs = obs.on_end(EndSummary(outputs={"adapter": str(tmp_path / "out" / "adapter")}))
    return obs, outputs


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def test_wandb_offline_run_files(offline_wandb, tmp_path):
    pytest.importorskip("wandb")
    from tests.observe.wandb_records import read_finished_run

    cfg = make_cfg(output_dir=str(tmp_path / "out"), report_to=["wandb"], wandb_project="proj")
    obs, outputs = run_five_steps(cfg, tmp_path)
    run_dirs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and outputs["wandb_run"] == str(run_dirs[0])
    assert f"upload with: wandb sync {run_dirs[0]}" in obs.console.console.file.getvalue()
    run = read_finished_run(next(run_dirs[0].glob("run-*.wandb")))
    assert run["run"] is not None, run["kinds"]
    assert run["run"].project == "proj" and run["run"].display_name == obs.run_name
    assert run["config"]["model"] == "Qwen/Qwen3-0.6B" and run["config"]["report_to"] == ["wandb"]
    rows = {r["_step"]: r for r in run["history"]}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [rows[s]["train/loss"] for s in range(1, 6)] == pytest.approx([2.9, 2.8, 2.7, 2.6, 2.5])
    assert rows[3]["train/lr"] == pytest.approx(3e-4) and rows[5]["eval/loss"] == 2.7  # eval merged into step 5
    assert run["summary"]["outputs"]["adapter"].endswith("adapter")
    assert run["summary"]["outputs"]["loss_plot"].endswith("training_loss.png")
    assert run["summary"]["final_eval_loss"] == 2.7 and run["exit"].exit_code == 0


def test_wandb_name_overrides_run_name(offline_wandb, tmp_path):
    pytest.importorskip("wandb")
    from tests.observe.wandb_records import read_finished_run

    cfg = make_cfg(output_dir=str(tmp_path / "out"), report_to="wandb", run_name="rn", wandb_name="wn")
    run_five_steps(cfg, tmp_path)
    (path,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    run = read_finished_run(path)
    assert run["run"].display_name == "wn" and run["run"].project == "surogate"


def test_wandb_mode_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def by_step(metric) -> dict:
    steps, (values, _epochs, _times) = metric.data.items_list()
    return dict(sorted(zip(steps, values, strict=True)))


@pytest.fixture(scope="module")
def aim_repo_dir(tmp_path_factory):
    """One repo for the aim tests: creating a repo runs aim's database migrations (seconds)."""
    pytest.importorskip("aim")
    return tmp_path_factory.mktemp("aim") / "repo"


def test_aim_local_repo_queried_back(tmp_path, aim_repo_dir):
    import aim

    repo_dir = aim_repo_dir
    cfg = make_cfg(output_dir=str(tmp_path / "out"), report_to=["aim"], aim_repo=str(repo_dir),
                   aim_experiment="exp1")
    obs, outputs = run_five_steps(cfg, tmp_path)
    assert outputs["aim_run"] == str(repo_dir / ".aim")
    runs = [r for r in aim.Repo(str(repo_dir)).iter_runs() if r.experiment == "exp1"]
    assert len(runs) == 1
    run = runs[0]
    assert run.name == obs.run_name and run.experiment == "exp1"
    assert run["hparams"]["model"] == "Qwen/Qwen3-0.6B" and run["hparams"]["aim_experiment"] == "exp1"
    assert run["summary"]["outputs"]["adapter"].endswith("adapter") and run["status"] == "completed"
    series = {(m.name, m.context.to_dict()["subset"]): m for m in run.metrics()}
    loss = by_step(series[("loss", "train")])
    assert list(loss) == [1, 2, 3, 4, 5] and list(loss.values()) == pytest.approx([2.9, 2.8, 2.7, 2.6, 2.5])
    assert by_step(series[("loss", "eval")]) == {5: 2.7}
    assert list(by_step(series[("lr", "train")]).values()) == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 5e-4])


def test_aim_name(tmp_path, aim_repo_dir):
    import aim

    cfg = make_cfg(output_dir=str(tmp_path / "o"), report_to=["aim"], aim_repo=str(aim_repo_dir), aim_name="an",
                   aim_experiment="exp2")
    run_five_steps(cfg, tmp_path)
    assert [r.name for r in aim.Repo(str(aim_repo_dir)).iter_runs() if r.experiment == "exp2"] == ["an"]


@pytest.mark.parametrize("target", ["wandb", "aim"])
def test_missing_extra_names_the_install(monkeypatch, tmp_path, target):
    monkeypatch.setitem(sys.modules, target, None)  # makes `import <target>` raise ImportError
    cfg = make_cfg(output_dir=str(tmp_path), report_to=[target])
    with pytest.raises(UserError, match=rf"report_to: '{target}' needs .* pip install 'surogate\[{target}\]'"):
        TrainingObserver(cfg, None, make_info(), console_file=io.StringIO())
    assert not list(tmp_path.iterdir())  # failed before writing anything
