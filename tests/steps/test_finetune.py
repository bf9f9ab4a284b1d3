import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kftune.fileio import read_json
from kftune.steps.finetune import epoch_batches, finetune, planned_epochs
from tests.conftest import with_changes


def test_length_grouped_batches_cover_every_example_once_and_are_shuffled():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=5000)
    batches = epoch_batches(lengths, 16, seed=1, epoch=0, group_by_length=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 10, "a batch should hold texts of similar length"
    firsts = [lengths[b].max() for b in batches]
    assert abs(np.corrcoef(np.arange(len(firsts)), firsts)[0, 1]) < 0.2, "batches must not run long-to-short"
    again = epoch_batches(lengths, 16, seed=1, epoch=0, group_by_length=True)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = epoch_batches(lengths, 16, seed=1, epoch=1, group_by_length=True)
    assert any((a != b).any() for a, b in zip(batches, other) if len(a) == len(b))


def test_epochs_zero_means_three_for_texts_and_five_for_taggers(prepared, params):
    auto = with_changes(params.finetune, epochs=0, max_steps=0)
    assert planned_epochs(auto, {"task": "sequence-classification"}) == 3
    assert planned_epochs(auto, {"task": "token-classification"}) == 5
    assert planned_epochs(with_changes(auto, epochs=2), {"task": "token-classification"}) == 2, "a number stands"
    train_rows = len(pd.read_parquet(prepared / "tokenized" / "train.parquet"))
    summary = finetune(prepared / "tokenized", prepared / "auto", params.model.name,
                       with_changes(auto, batch_size=train_rows, eval_every_steps=0))
    assert (summary["epochs_planned"], summary["total_steps_planned"], summary["steps"]) == (3, 3, 3)


def test_learns_the_task_and_writes_a_loadable_model(prepared, params):
    logged = []
    summary = finetune(prepared / "tokenized", prepared / "model", params.model.name, params.finetune,
                       on_log=lambda m, step: logged.append((step, m)))
    assert summary["best_val_macro_f1"] > 0.9
    assert summary["steps"] == 300 and summary["examples_per_second"] > 0
    train_logs = [s for s, m in logged if "train_loss" in m]
    assert train_logs == list(range(10, 301, 10)), "metrics every log_every_steps, not every step"
    assert [s for s, m in logged if "val_macro_f1" in m] == [100, 200, 300]
    model = AutoModelForSequenceClassification.from_pretrained(prepared / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert AutoTokenizer.from_pretrained(prepared / "model").model_max_length == params.tokenize.max_length
    assert read_json(prepared / "model" / "train_summary.json") == summary


def test_early_stopping_stops_when_validation_stalls(prepared, params):
    # validate every 10 steps with patience 2: a flat-lined run stops long before max_steps
    cfg = with_changes(params.finetune, learning_rate=1e-9, eval_every_steps=10, early_stopping_patience=2)
    summary = finetune(prepared / "tokenized", prepared / "model", params.model.name, cfg)
    assert summary["stopped_early"] and summary["steps"] == 30 and summary["best_step"] == 10


def test_the_saved_model_is_the_best_validation_checkpoint_not_the_last(prepared, params):
    import pandas as pd

    from kftune.predict import predict_logits
    from kftune.metrics import macro_f1

    # warm up to a learning rate far too high: the model learns early, then training blows up
    cfg = with_changes(params.finetune, learning_rate=3e-2, warmup_ratio=0.95, eval_every_steps=10, max_steps=300,
                       early_stopping_patience=0)
    scores = {}
    summary = finetune(prepared / "tokenized", prepared / "model", params.model.name, cfg,
                       on_log=lambda m, step: scores.update({step: m["val_macro_f1"]}) if "val_macro_f1" in m else None)
    assert scores[300] < max(scores.values()) - 0.2, f"precondition: the run must end far below its best {scores}"
    model = AutoModelForSequenceClassification.from_pretrained(prepared / "model")
    val = pd.read_parquet(prepared / "tokenized" / "validation.parquet")
    saved = macro_f1(val["label"], predict_logits(model, [list(x) for x in val["input_ids"]], 0, 64).argmax(1), 2)
    assert saved == pytest.approx(max(scores.values())) == pytest.approx(summary["best_val_macro_f1"])


def _weights(path):
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


def test_frozen_layers_do_not_change(prepared, params):
    from kftune.base_models import resolve_base_model

    cfg = with_changes(params.finetune, freeze_embeddings=True, freeze_layers=1, max_steps=30)
    finetune(prepared / "tokenized", prepared / "model", params.model.name, cfg)
    before = AutoModelForSequenceClassification.from_pretrained(resolve_base_model(params.model.name),
                                                                 num_labels=2).state_dict()
    after = _weights(prepared / "model")
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["bert.encoder.layer.1.attention.self.query.weight"],
                           after["bert.encoder.layer.1.attention.self.query.weight"])


def test_freezing_more_layers_than_exist_is_an_error(prepared, params):
    with pytest.raises(ValueError, match="freeze_layers=5: the model has only 2 layers"):
        finetune(prepared / "tokenized", prepared / "model", params.model.name, with_changes(params.finetune, freeze_layers=5))


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(prepared, params):
    cfg = with_changes(params.finetune, max_steps=60, checkpoint_every_steps=20, eval_every_steps=30,
                       grad_accum_steps=2)
    finetune(prepared / "tokenized", prepared / "straight", params.model.name, cfg)

    def kill_at_50(metrics, step):
        if step == 50:
            raise Killed

    with pytest.raises(Killed):
        finetune(prepared / "tokenized", prepared / "resumed", params.model.name, cfg,
                 checkpoint_dir=prepared / "ckpt", on_log=kill_at_50)
    assert not (prepared / "resumed").exists(), "a killed run must leave no model behind"
    summary = finetune(prepared / "tokenized", prepared / "resumed", params.model.name, cfg,
                       checkpoint_dir=prepared / "ckpt")
    assert summary["resumed_from_step"] == 40 and summary["steps"] == 60
    straight, resumed = _weights(prepared / "straight"), _weights(prepared / "resumed")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    assert not (prepared / "ckpt").exists(), "a finished run removes its checkpoint and its emptied folder"


def test_a_damaged_checkpoint_is_set_aside_and_training_starts_over(prepared, params, caplog):
    cfg = with_changes(params.finetune, max_steps=10, checkpoint_every_steps=5)
    (prepared / "ck").mkdir()
    (prepared / "ck" / "checkpoint.pt").write_bytes(b"\x80" + bytes(999))  # a write cut short by a power loss
    summary = finetune(prepared / "tokenized", prepared / "fresh", params.model.name, cfg,
                       checkpoint_dir=prepared / "ck")
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 10
    assert (prepared / "ck" / "checkpoint.pt.damaged").exists() and "cannot be read" in caplog.text


def test_two_processes_under_torchrun_train_one_model(prepared, params, mlflow_store):
    """DDP as on a multi-GPU node, here with two gloo workers on the CPU; with a token budget that cuts only
    the longer batches, so in some steps one process runs more passes than the other (and must not hang).
    Rank 0 alone logs the steps to the MLflow run, as a single process would."""
    import mlflow

    from kftune.steps.finetune import launch, micro_batches

    lengths = pd.read_parquet(prepared / "tokenized" / "train.parquet")["input_ids"].map(len).to_numpy()
    cfg = with_changes(params.finetune, micro_batch_tokens=int(params.finetune.batch_size * np.median(lengths)))
    batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
    assert len({len(micro_batches(b, lengths, cfg.micro_batch_tokens)) for b in batches}) > 1
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("ddp").experiment_id).info.run_id
    launch(str(prepared / "tokenized"), str(prepared / "ddp"), params.model.name, cfg, processes=2, run_id=run_id)
    summary = read_json(prepared / "ddp" / "train_summary.json")
    assert summary["processes"] == 2 and summary["best_val_macro_f1"] > 0.9
    assert summary["steps"] == params.finetune.max_steps
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_macro_f1")
    steps = [m.step for m in history]
    assert steps and steps == sorted(set(steps)), "each validation logged once (rank 0), not once per process"
    assert max(m.value for m in history) == pytest.approx(summary["best_val_macro_f1"], abs=1e-6)
    AutoModelForSequenceClassification.from_pretrained(prepared / "ddp")


def test_a_killed_torchrun_fine_tune_resumes_every_process_to_the_same_weights(prepared, params):
    """Each process restores its own random state (dropout): with rank 0's on both, the weights differ."""
    import signal
    import subprocess
    import time

    import psutil

    from kftune.steps.finetune import launch, torchrun_command

    cfg = with_changes(params.finetune, max_steps=40, checkpoint_every_steps=5, eval_every_steps=20)
    tokenized, ckpt = str(prepared / "tokenized"), prepared / "ckpt"
    launch(tokenized, str(prepared / "straight"), params.model.name, cfg, processes=2)
    first = subprocess.Popen(torchrun_command(tokenized, str(prepared / "resumed"), params.model.name, cfg, 2,
                                              checkpoint_dir=str(ckpt)), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "checkpoint.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        for proc in [*psutil.Process(first.pid).children(recursive=True), psutil.Process(first.pid)]:
            proc.kill()  # at the first checkpoint the power goes: torchrun and its workers (each in its own session)
    finally:
        first.wait(30)
    assert first.returncode == -signal.SIGKILL and not (prepared / "resumed").exists()
    launch(tokenized, str(prepared / "resumed"), params.model.name, cfg, processes=2, checkpoint_dir=str(ckpt))
    summary = read_json(prepared / "resumed" / "train_summary.json")
    assert 0 < summary["resumed_from_step"] < 40 and summary["steps"] == 40
    straight, resumed = _weights(prepared / "straight"), _weights(prepared / "resumed")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, msg=lambda m, name=name: f"{name}: {m}")


def test_a_collapsed_run_is_trained_again_from_the_next_seed_and_the_better_run_kept(prepared, params):
    # a learning rate this small leaves the random head where it starts: one label for every text
    cfg = with_changes(params.finetune, learning_rate=1e-9, max_steps=4, eval_every_steps=2, restarts=2)
    logged = []
    summary = finetune(prepared / "tokenized", prepared / "model", params.model.name, cfg,
                       on_log=lambda m, step: logged.append((step, m)))
    tries = summary["collapsed_runs"]
    assert [t["seed"] for t in tries] == [cfg.seed, cfg.seed + 1]
    assert all(t["labels_never_predicted"] == 1 for t in tries), tries
    assert summary["seed"] in (cfg.seed, cfg.seed + 1, cfg.seed + 2)
    assert summary["best_val_macro_f1"] == max([t["best_val_macro_f1"] for t in tries] + [summary["best_val_macro_f1"]])
    assert summary["train_seconds"] > sum(t["train_seconds"] for t in tries), "the cost of every run is counted"
    assert [s for s, m in logged if "val_macro_f1" in m] == [2, 4, 6, 8, 10, 12], "MLflow's steps go on"

    def head(seed):  # the classifier a run starts from; at lr 1e-9 it is where that run ends
        from transformers import set_seed

        set_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(params.model.name, num_labels=2).classifier.weight

    saved = AutoModelForSequenceClassification.from_pretrained(prepared / "model").classifier.weight
    assert torch.allclose(saved, head(summary["seed"]), atol=1e-6), "the kept run's weights are the ones saved"
    assert not torch.allclose(saved, head(summary["seed"] + 1), atol=1e-3)

    healthy = finetune(prepared / "tokenized", prepared / "healthy", params.model.name, with_changes(cfg, restarts=0))
    assert healthy["collapsed_runs"] == [] and healthy["seed"] == cfg.seed


def test_micro_batches_cut_a_long_batch_under_the_token_budget_and_keep_every_row():
    from kftune.steps.finetune import micro_batches

    lengths = np.array([90, 12, 88, 93, 40, 91, 85, 7])
    batch = list(range(8))
    assert micro_batches(batch, lengths, 0) == [batch], "0: no limit"
    assert micro_batches(batch, lengths, 8 * 93) == [batch], "a batch that fits stays one pass"
    parts = micro_batches(batch, lengths, 200)
    assert sorted(i for p in parts for i in p) == batch
    assert all(len(p) * max(lengths[i] for i in p) <= 200 for p in parts), parts
    assert micro_batches([3, 7], lengths, 50) == [[7], [3]], "a text over the budget alone is its own part"


@pytest.mark.parametrize("ner", [False, True])
def test_a_batch_run_in_parts_or_accumulated_batches_takes_the_same_step_as_one_pass(ner):
    """Weighted by labelled rows (tokens, for tagging), the parts' gradients add up to the whole batch's; so do
    the gradients of accumulated batches of unequal sizes (an epoch's short last batch, grad_accum_steps)."""
    import types

    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    from kftune.ner import IGNORE
    from kftune.steps.finetune import _train_step

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = [3, 4, 9, 10, 12, 5, 11, 2]
    x = [rng.integers(1, 50, n).tolist() for n in lengths]
    if ner:  # unequal labelled tokens per row, as with sub-tokens and special tokens
        y = [np.where(rng.random(n) < 0.3, IGNORE, rng.integers(0, 3, n)) for n in lengths]
    else:
        y = rng.integers(0, 3, len(x))
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    base = (BertForTokenClassification if ner else BertForSequenceClassification)(config).eval()  # no dropout
    after = []
    for budget, group in ((0, [list(range(8))]), (24, [list(range(8))]), (0, [[0, 1, 2, 3, 4, 5], [6, 7]])):
        model = type(base)(config).eval()
        model.load_state_dict(base.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        job = types.SimpleNamespace(
            train=(x, y, None), train_lengths=np.array(lengths), pad_id=0, ner=ner, bf16=False, world=1,
            device=torch.device("cpu"), model=model, train_model=model, optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            cfg=types.SimpleNamespace(micro_batch_tokens=budget, max_grad_norm=0))
        loss = _train_step(job, group)
        after.append((loss, model.state_dict()))
    (loss_whole, whole), *others = after
    for loss_other, other in others:
        assert loss_other == pytest.approx(loss_whole, rel=1e-5)
        for name, tensor in whole.items():
            torch.testing.assert_close(other[name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    assert any(not torch.equal(whole[n], base.state_dict()[n]) for n in whole), "the step must move the weights"


def test_every_process_reseeds_its_own_dropout_at_a_checkpoint_boundary():
    """What the torchrun resume relies on: the draws after a boundary depend on (seed, rank, step) only."""
    from types import SimpleNamespace

    from kftune.steps.finetune import _reseed

    def draws(rank: int, step: int):
        _reseed(SimpleNamespace(cfg=SimpleNamespace(seed=42), rank=rank, state={"step": step}))
        return torch.rand(8)

    assert torch.equal(draws(1, 20), draws(1, 20)), "a resumed process draws what the interrupted one did"
    assert not torch.equal(draws(0, 20), draws(1, 20)), "processes keep independent dropout"
    assert not torch.equal(draws(1, 20), draws(1, 40))


def test_a_taggers_validation_scores_whole_sentences_as_evaluate_does(monkeypatch):
    """An entity across a window boundary (a sentence longer than tokenize.max_length) is one entity: scored per
    window it was two, and a prediction that found only its first part scored as half right."""
    import numpy as np

    from kftune import predict
    from kftune.steps.finetune import validation_metrics

    labels = ["O", "B-ORG", "I-ORG"]
    # one sentence "a b c d e Bank of America" in two windows: words 0-5 ([CLS] + 6 words) and 6-7
    windows = [([-1, 0, 1, 2, 3, 4, 5, -1], 0, 0), ([-1, 0, 1, -1], 0, 6)]
    gold = [np.array([-100, 0, 0, 0, 0, 0, 1, -100]), np.array([-100, 2, 2, -100])]
    found = [[0, 0, 0, 0, 0, 1], [0, 0]]  # "Bank" tagged B-ORG, "of America" missed

    def logits(model, x, pad_id, batch_size, bf16):
        return [np.eye(3)[[0, *tags, 0]] * 5 for tags in found]

    monkeypatch.setattr(predict, "predict_token_logits", logits)
    m = validation_metrics(None, [[0] * 8, [0] * 4], gold, windows, 0, labels, 8, False)
    assert m["val_entity_f1"] == 0.0, "ORG 'Bank' is not ORG 'Bank of America'"
    found[1] = [2, 2]
    assert validation_metrics(None, [[0] * 8, [0] * 4], gold, windows, 0, labels, 8, False)["val_entity_f1"] == 1.0


def test_a_validation_split_of_one_label_is_warned_about(prepared, params, tmp_path, caplog):
    tokenized = prepared / "tokenized"
    val = pd.read_parquet(tokenized / "validation.parquet")
    val.assign(label=0).to_parquet(tokenized / "validation.parquet")
    finetune(tokenized, tmp_path / "m", params.model.name, with_changes(params.finetune, max_steps=1, restarts=0))
    assert "every validation row has the label 'negative'" in caplog.text
