"""The sweep plot (pipelines/_sweep_plot.py): valid SVG, one panel per varying config key, pruned runs drawn
hollow and named in the legend, a log axis for a learning-rate span, nothing when no key varies."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, replace

import pytest

from unipt.pipelines._sweep_plot import sweep_plot, varying_keys
from unipt.train import RunResult, TrainConfig

SVG = "{http://www.w3.org/2000/svg}"


def run(name: str, accuracy: float, *, pruned_at: int | None = None, **changes) -> RunResult:
    """A result whose config is TrainConfig's resolved fields with ``changes`` (``model``: the method's options)."""
    config = asdict(replace(TrainConfig(epochs=3, data_seed=0), **changes))
    return RunResult(name=name, method=config["method"], trainable_params=1000, best_epoch=2,
                     eval_metrics={"accuracy": accuracy, "macro_f1": accuracy - 0.1, "loss": 1 - accuracy},
                     test_metrics=None if pruned_at else {"accuracy": accuracy}, train_seconds=1.0,
                     train_examples_per_s=100.0, checkpoint=f"checkpoints/{name}", config=config,
                     pruned_at=pruned_at)


def lr_sweep() -> list[RunResult]:
    """lr 1e-4 .. 1e-2 (100x) times model.reduction 2, 4; the worst run pruned after epoch 1."""
    results = []
    for i, lr in enumerate([1e-4, 1e-3, 1e-2]):
        for j, reduction in enumerate([2, 4]):
            name = f"unipt@lr={lr},model.reduction={reduction}"
            accuracy = 0.5 + 0.1 * i + 0.02 * j
            results.append(run(name, accuracy, pruned_at=1 if accuracy == 0.5 else None, lr=lr,
                               model={"reduction": reduction}))
    return results


def panels(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-key"): g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"}


def texts(element: ET.Element) -> list[str]:
    return [t.text for t in element.iter(f"{SVG}text")]


def test_one_panel_per_swept_key_with_a_log_axis_for_lr_and_pruned_runs_marked(tmp_path):
    results = lr_sweep()
    path = sweep_plot(results, tmp_path / "plots" / "sweep.svg")
    assert path == tmp_path / "plots" / "sweep.svg"
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 0 and root.get("viewBox")
    assert any(t.startswith("Sweep of 6 runs: validation accuracy") for t in texts(root))  # the title

    by_key = panels(root)
    assert list(by_key) == ["lr", "model.reduction"] == varying_keys(results)
    lr, reduction = by_key["lr"], by_key["model.reduction"]
    assert lr.get("data-scale") == "log" and "lr (log scale)" in texts(lr)
    assert {"0.0001", "0.001", "0.01"} <= set(texts(lr))  # decade ticks
    assert reduction.get("data-scale") == "category" and {"2", "4", "model.reduction"} <= set(texts(reduction))
    assert {"0.50", "0.55", "0.60", "0.65", "0.70"} <= set(texts(lr))  # y ticks

    for panel in (lr, reduction):
        circles = list(panel.iter(f"{SVG}circle"))
        assert sorted(c.get("data-run") for c in circles) == sorted(r.name for r in results)
        hollow = [c for c in circles if "pruned" in c.get("class").split()]
        assert [c.get("data-run") for c in hollow] == ["unipt@lr=0.0001,model.reduction=2"]
        assert hollow[0].get("fill-opacity") == "0" and hollow[0].get("stroke") == "#7f7f7f"
        assert "pruned after epoch 1" in hollow[0].find(f"{SVG}title").text
        # higher accuracy is drawn higher, inside the plot's frame
        frame = panel.find(f"{SVG}rect")
        top, bottom = float(frame.get("y")), float(frame.get("y")) + float(frame.get("height"))
        accuracy = {r.name: r.eval_metrics["accuracy"] for r in results}
        ys = sorted((accuracy[c.get("data-run")], float(c.get("cy"))) for c in circles)
        assert all(top < y < bottom for _, y in ys)
        assert [y for _, y in ys] == sorted((y for _, y in ys), reverse=True)

    legend = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "legend")
    assert "pruned (1)" in texts(legend) and "trained out (5)" in texts(legend)
    assert "unipt@lr=0.0001,model.reduction=2 (after epoch 1)" in texts(legend)


def test_a_log_axis_spaces_decades_evenly_and_a_narrow_span_is_categorical(tmp_path):
    decades = [run(f"r{lr}", 0.6, lr=lr) for lr in (1e-5, 1e-4, 1e-3)]
    lr = panels(ET.parse(sweep_plot(decades, tmp_path / "a.svg")).getroot())["lr"]
    xs = [float(c.get("cx")) for c in lr.iter(f"{SVG}circle")]
    assert lr.get("data-scale") == "log" and math.isclose(xs[1] - xs[0], xs[2] - xs[1], rel_tol=1e-3)

    narrow = [run(f"r{lr}", 0.6 + lr, lr=lr) for lr in (1e-3, 5e-3, 2e-2)]  # 20x: not more than LOG_SPAN
    assert panels(ET.parse(sweep_plot(narrow, tmp_path / "b.svg")).getroot())["lr"].get("data-scale") == "category"
    methods = [run("unipt", 0.6), run("probe", 0.5, method="linear_probe")]
    method = panels(ET.parse(sweep_plot(methods, tmp_path / "c.svg")).getroot())["method"]
    assert method.get("data-scale") == "category" and {"unipt", "linear_probe"} <= set(texts(method))


def test_another_metric_and_the_errors(tmp_path):
    results = lr_sweep()
    root = ET.parse(sweep_plot(results, tmp_path / "f1.svg", metric="macro_f1")).getroot()
    assert any("validation macro_f1" in t for t in texts(root))
    with pytest.raises(ValueError, match=r"no run has an eval metric 'recall'.*\['accuracy', 'loss', 'macro_f1'\]"):
        sweep_plot(results, tmp_path / "x.svg", metric="recall")


def test_nothing_is_drawn_when_no_key_varies(tmp_path):
    same = [run("a", 0.6), run("b", 0.7)]
    assert varying_keys(same) == []
    assert sweep_plot(same, tmp_path / "none.svg") is None and not (tmp_path / "none.svg").exists()
    assert sweep_plot([], tmp_path / "none.svg") is None
