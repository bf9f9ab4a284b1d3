"""`kftune predict`: files in, predictions out in input order, clear errors; the KFP component and pipeline."""

import json

import pandas as pd
import pytest
import yaml

from kftune.config import load_params
from kftune.serving.batch import predict_file
from kftune.serving.model import ServingError, load_version, parse_model_ref
from tests.conftest import ROOT, subword_texts, use_mlflow_store
from tests.serving.conftest import CLASSIFIER, TAGGER


@pytest.fixture(scope="module")
def classifier(serve_store):
    with pytest.MonkeyPatch.context() as mp:
        use_mlflow_store(serve_store, mp)
        cfg = load_params(ROOT / "params.yaml", ["serve.precision=fp32"]).serve
        return load_version(CLASSIFIER, "1", cfg)


@pytest.fixture
def texts(tmp_path):
    df = subword_texts(57, seed=5).assign(id=range(57))
    df.loc[3, "text"] = ""  # an empty text is a text
    return df


@pytest.mark.parametrize("src, dst", [("csv", "jsonl"), ("jsonl", "parquet"), ("parquet", "csv"), ("tsv", "tsv")])
def test_predictions_come_back_in_input_order(tmp_path, classifier, texts, src, dst):
    path = tmp_path / f"in.{src}"
    {"csv": lambda: texts.to_csv(path, index=False), "tsv": lambda: texts.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: texts.to_json(path, orient="records", lines=True),
     "parquet": lambda: texts.to_parquet(path)}[src]()
    out = predict_file(classifier, str(path), str(tmp_path / f"out.{dst}"), chunk_rows=10, batch_size=4, progress=False)
    assert out["rows"] == 57 and out["version"] == "1"
    got = {"csv": lambda p: pd.read_csv(p, keep_default_na=False), "tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=False),
           "jsonl": lambda p: pd.read_json(p, lines=True), "parquet": pd.read_parquet}[dst](tmp_path / f"out.{dst}")
    assert got["id"].tolist() == list(range(57)) and got["text"].tolist() == texts["text"].tolist()
    direct = classifier.predict(texts["text"].tolist(), 32)
    assert got["label"].tolist() == [a["label"] for a in direct], "chunking and sorting change nothing"
    probs = got["probabilities"].map(lambda p: p if isinstance(p, dict) else json.loads(p))
    assert probs.map(lambda p: max(p, key=p.get)).tolist() == got["label"].tolist()
    assert got["model_version"].astype(str).eq("1").all()
    assert not list(tmp_path.glob(".*tmp")), "no temp file left"


def test_entities_for_token_classification(tmp_path, serve_store, monkeypatch):
    use_mlflow_store(serve_store, monkeypatch)
    served = load_version(TAGGER, "1", load_params(ROOT / "params.yaml", ["serve.precision=fp32"]).serve)
    pd.DataFrame({"text": ["gainoku said", "the lossira dropmek unit"]}).to_csv(tmp_path / "in.csv", index=False)
    predict_file(served, str(tmp_path / "in.csv"), str(tmp_path / "out.jsonl"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["gainoku said", "the lossira dropmek unit"]
    assert any(r["entities"] for r in rows), "the tagger finds something: the offset checks below run"
    for r in rows:
        assert isinstance(r["entities"], list) and all(r["text"][s["start"]:s["end"]] == s["text"] for s in r["entities"])


@pytest.mark.parametrize("content, name, message", [
    ("", "in.csv", "the file is empty"),
    ("text,label\n", "in.csv", "no rows to predict"),
    ("words\nhello\n", "in.csv", "no column 'text' (columns: words)"),
    ('{"text": "a"}\n{"text": 3}\n', "in.jsonl", "row 2: 'text' is int 3, not a text"),
    ('{"text": "a"\n', "in.jsonl", "in.jsonl:1: not JSON"),
    ('{"text": "a"}\n["b"]\n', "in.jsonl", "in.jsonl:2: expected one JSON object per line, got list"),
    ("a", "in.txt", "cannot tell the format"),
])
def test_bad_input_files_say_what_is_wrong(tmp_path, classifier, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ServingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict_file(classifier, str(tmp_path / name), str(tmp_path / "out.parquet"), progress=False)
    assert not (tmp_path / "out.parquet").exists() and not list(tmp_path.glob(".out*")), "nothing half-written"


def test_model_references():
    assert parse_model_ref("m") == ("m", "champion", None)
    assert parse_model_ref("m@challenger") == ("m", "challenger", None)
    assert parse_model_ref("m/7") == ("m", None, "7")
    with pytest.raises(ServingError, match="after '/' comes a version number"):
        parse_model_ref("m/latest")


def test_the_predict_command_end_to_end(tmp_path, serve_store, monkeypatch, capsys):
    from kftune.serving.__main__ import main

    use_mlflow_store(serve_store, monkeypatch)
    subword_texts(20, seed=9).to_parquet(tmp_path / "in.parquet")
    args = ["--project-dir", str(serve_store), "predict", "--model", f"{CLASSIFIER}@champion", "--input",
            str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.csv"), "--params", str(ROOT / "params.yaml"),
            "--precision", "fp32", "--no-progress"]
    assert main(args) == 0
    assert "wrote 20 predictions" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "out.csv")) == 20
    assert main([*args[:4], "nope", *args[5:]]) == 2
    assert "nope@champion: no such alias" in capsys.readouterr().err
    # a missing input is named before anything is loaded (here, before the unknown model is looked up)
    missing = [*args[:4], "nope", "--input", str(tmp_path / "missing.csv"), *args[7:-1]]
    assert main(missing) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    with pytest.raises(ServingError, match="missing.csv: no such file"):  # with a progress bar, which counts rows
        predict_file(None, str(tmp_path / "missing.csv"), str(tmp_path / "out.csv"), progress=True)


def test_serve_and_predict_are_kftune_subcommands():
    from kftune.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9000"])
    assert args.port == 9000 and args.alias == "champion" and args.host == "127.0.0.1"
    args = build_parser().parse_args(["predict", "--model", "m@x", "--input", "a.csv", "--output", "b.jsonl"])
    assert args.func.__name__ == "cmd_predict"


def test_component_and_pipeline(tmp_path, serve_store, monkeypatch):
    from kfp import compiler
    from kfp.dsl import Dataset

    from components.batch_predict import batch_predict_op
    from pipelines.batch_predict import create_pipeline

    use_mlflow_store(serve_store, monkeypatch)
    defaults = load_params(ROOT / "params.yaml", ["serve.precision=fp32"]).to_dict()
    subword_texts(15, seed=3).to_csv(tmp_path / "in.csv", index=False)
    out = Dataset(name="predictions", uri=str(tmp_path / "predictions"))
    version = batch_predict_op.python_func(model=CLASSIFIER, input_path=str(tmp_path / "in.csv"), params=defaults,
                                           predictions=out)
    assert version == "1" and len(pd.read_parquet(out.path)) == 15 and out.metadata["rows"] == 15

    compiler.Compiler().compile(create_pipeline(defaults, image="reg.example/kftune:1", cluster=True),
                                str(tmp_path / "p.yaml"))
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    task = spec["root"]["dag"]["tasks"]["batch-predict-op"]
    assert task["taskInfo"]["name"] == "1 batch predict" and not task["cachingOptions"].get("enableCache")
    assert spec["deploymentSpec"]["executors"]["exec-batch-predict-op"]["container"]["image"] == "reg.example/kftune:1"
    assert spec["root"]["inputDefinitions"]["parameters"]["model"]["defaultValue"] == "kftune-demo@champion"
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-batch-predict-op"]["secretAsEnv"]
    assert {s["secretName"] for s in secrets} == {"kftune-mlflow", "kftune-s3"}


def test_parquet_output_takes_a_column_empty_in_the_first_chunk(tmp_path):
    import pandas as pd

    from kftune.serving.batch import _Writer

    out = _Writer(tmp_path / "out.parquet", "parquet")
    out.write(pd.DataFrame({"text": ["a"], "note": [None], "label": ["x"]}))
    out.write(pd.DataFrame({"text": ["b"], "note": ["later"], "label": ["y"]}))
    out.close()
    assert pd.read_parquet(tmp_path / "out.parquet")["note"].fillna("").tolist() == ["", "later"]


def test_columns_keep_their_place_and_name_whatever_the_input(tmp_path, classifier):
    rows = [{"id": "x1", "text": "gainoku said", "label": "positive"}, {"text": "the lossira", "id": "x2"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    predict_file(classifier, str(tmp_path / "in.jsonl"), str(tmp_path / "out.csv"), chunk_rows=1, progress=False)
    got = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert got["id"].tolist() == ["x1", "x2"] and got["text"].tolist() == ["gainoku said", "the lossira"]
    assert got["input_label"].tolist() == ["positive", ""], "a true label is kept beside the predicted one"
    predict_file(classifier, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), chunk_rows=1, progress=False)
    second = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[1])  # strict JSON: no NaN
    assert "input_label" not in second or second["input_label"] is None
    (tmp_path / "more.jsonl").write_text(json.dumps(rows[1]) + "\n" + json.dumps({**rows[1], "extra": "E"}) + "\n")
    with pytest.raises(ServingError, match=r"rows 2-2 have field\(s\) \['extra'\].*write JSON Lines"):
        predict_file(classifier, str(tmp_path / "more.jsonl"), str(tmp_path / "o.csv"), chunk_rows=1, progress=False)
    pd.DataFrame({"id": ["a", "b"], "text": ["x y", "z"]}).set_index("id").to_parquet(tmp_path / "ix.parquet")
    predict_file(classifier, str(tmp_path / "ix.parquet"), str(tmp_path / "ix.csv"), progress=False)
    assert pd.read_csv(tmp_path / "ix.csv")["id"].tolist() == ["a", "b"], "a named index is a column of the input"
    (tmp_path / "q.tsv").write_text('text\n"open quote\nplain\nclose" quote\n"Quoted" said he\n')
    predict_file(classifier, str(tmp_path / "q.tsv"), str(tmp_path / "q.jsonl"), progress=False)
    texts = [json.loads(line)["text"] for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert texts == ['"open quote', "plain", 'close" quote', '"Quoted" said he'], "TSV is read without quoting"


def test_ids_come_back_exactly_and_outputs_never_replace_inputs(tmp_path, classifier):
    import pyarrow.parquet as pq

    pd.DataFrame({"id": [7, 8, 9], "text": ["a b", "c", "d e"]}).set_index("id").to_parquet(tmp_path / "r.parquet")
    predict_file(classifier, str(tmp_path / "r.parquet"), str(tmp_path / "r.jsonl"), chunk_rows=2, progress=False)
    assert [json.loads(line)["id"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [7, 8, 9], \
        "a named index of consecutive ids, which pandas keeps in the metadata only"
    big = [9007199254740993, None, 9007199254740995]  # over 2**53: a float would round them
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": "t", **({"id": i} if i else {})}) + "\n"
                                                for i in big))
    predict_file(classifier, str(tmp_path / "big.jsonl"), str(tmp_path / "big.parquet"), chunk_rows=2, progress=False)
    assert pq.read_table(tmp_path / "big.parquet").column("id").to_pylist() == big
    predict_file(classifier, str(tmp_path / "big.parquet"), str(tmp_path / "big.csv"), chunk_rows=2, progress=False)
    assert (tmp_path / "big.csv").read_text().count("9007199254740995,") == 1

    (tmp_path / "q.csv").write_text('text\nsay "hi"\n')
    predict_file(classifier, str(tmp_path / "q.csv"), str(tmp_path / "q.tsv"), progress=False)
    predict_file(classifier, str(tmp_path / "q.tsv"), str(tmp_path / "q2.jsonl"), progress=False)
    row = json.loads((tmp_path / "q2.jsonl").read_text())
    assert row["text"] == 'say "hi"' and json.loads(row["input_probabilities"]), "TSV out reads back as written"
    (tmp_path / "tab.jsonl").write_text(json.dumps({"text": "a\tb"}) + "\n")
    with pytest.raises(ServingError, match="row 1: column 'text' holds a tab or a line break"):
        predict_file(classifier, str(tmp_path / "tab.jsonl"), str(tmp_path / "tab.tsv"), progress=False)

    (tmp_path / "both.csv").write_text("text,label,input_label\nhello,gold,old\n")
    with pytest.raises(ServingError, match="columns label and input_label: the first would be kept as the second"):
        predict_file(classifier, str(tmp_path / "both.csv"), str(tmp_path / "both.jsonl"), progress=False)
    before = (tmp_path / "q.csv").read_text()
    for output in ("q.csv", ".q.csv.tmp"):
        (tmp_path / output).write_text(before)
        with pytest.raises(ServingError, match="the output would overwrite the input"):
            predict_file(classifier, str(tmp_path / output), str(tmp_path / "q.csv"), input_format="csv",
                         progress=False)
        assert (tmp_path / output).read_text() == before


def test_list_and_struct_input_columns_come_back_as_json_in_every_format(tmp_path, classifier):
    """Parquet hands list columns over as numpy arrays: written as JSON lists, not `['x' 'y']`."""
    pd.DataFrame({"text": ["a b", "c"], "tags": [["x", "y"], []], "meta": [{"n": 1}, {"n": 2}],
                  "scores": [[0.5, 1.5], [2.0]]}).to_parquet(tmp_path / "in.parquet")
    predict_file(classifier, str(tmp_path / "in.parquet"), str(tmp_path / "out.jsonl"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["tags"], r["meta"], r["scores"]) for r in rows] == [(["x", "y"], {"n": 1}, [0.5, 1.5]),
                                                                  ([], {"n": 2}, [2.0])]
    for fmt in ("csv", "tsv"):
        predict_file(classifier, str(tmp_path / "in.parquet"), str(tmp_path / f"out.{fmt}"), progress=False)
        got = pd.read_csv(tmp_path / f"out.{fmt}", sep="," if fmt == "csv" else "\t", keep_default_na=False)
        assert [json.loads(v) for v in got["tags"]] == [["x", "y"], []] and json.loads(got["meta"][1]) == {"n": 2}
        assert got["text"].tolist() == ["a b", "c"]
