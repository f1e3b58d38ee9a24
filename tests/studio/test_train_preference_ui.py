"""The Train tab and DPO / ORPO: the objective is a dropdown of the generated form, and the monitor's loss chart
shows the reward margin and the preference accuracy (train and validation) when the metrics rows carry them."""

from __future__ import annotations


def _rows(preference: bool) -> list[dict]:
    rows = []
    for i in range(1, 5):
        r = {"step": i, "total_steps": 4, "loss": 0.7 - 0.1 * i, "learning_rate": 1e-4, "tokens_per_s": 100.0}
        if preference:
            r.update({"rewards/margins": 0.2 * i, "rewards/accuracies": 0.25 * i})
            if i % 2 == 0:
                r.update({"eval_loss": 0.6, "eval_rewards/margins": 0.1 * i, "eval_rewards/accuracies": 0.5})
        rows.append(r)
    return rows


def test_objective_is_a_form_choice():
    from studio.handlers import train as ht
    from studio.tabs import train as tt

    assert ht.CHOICES["objective"] == ["sft", "dpo", "orpo"]
    assert {"objective", "beta", "orpo_lambda"} <= set(ht.FIELDS) and "objective" in tt.BASIC
    cfg = ht.config_from(ht.form_values(ht.TrainConfig(dataset="prefs", objective="dpo", beta=0.2)))
    assert (cfg.objective, cfg.beta) == ("dpo", 0.2)


def test_loss_chart_shows_margin_and_accuracy():
    from studio.handlers.train_monitor import figures

    loss, _lr, _tps = figures(_rows(True))
    names = {t.name: t for t in loss.data}
    assert {"train loss", "eval loss", "reward margin", "preference accuracy", "eval reward margin",
            "eval preference accuracy"} <= set(names)
    assert names["reward margin"].yaxis == "y2" and list(names["eval preference accuracy"].x) == [2, 4]
    assert "preference accuracy" in loss.layout.title.text and loss.layout.yaxis2.overlaying == "y"
    sft, _lr, _tps = figures(_rows(False))
    assert [t.name for t in sft.data] == ["train loss"] and sft.layout.title.text == "Loss"


def test_preference_verdict_markdown():
    from pipelines.training import verdict as tverdict

    v = {"kind": "preference", "objective": "dpo", "verdict": "the tuned model prefers the chosen answers more",
         "better": True, "examples": 8, "base": {"accuracy": 0.5, "margin": -0.2},
         "tuned": {"accuracy": 0.875, "margin": 1.5}}
    md = tverdict.verdict_markdown(v)
    assert "8 validation pairs" in md and "| 50% | 88% |" in md and "+1.500" in md
    from studio.handlers.train_monitor import verdict_figure

    fig = verdict_figure(v)["value"]  # accuracy and margin, base vs tuned
    assert {(tr.name, tr.xaxis): list(tr.y) for tr in fig.data} == {
        ("base", "x"): [0.5], ("tuned", "x"): [0.875], ("base", "x2"): [-0.2], ("tuned", "x2"): [1.5]}
