import pytest

from hlora.config import ConfigError, load_config
from hlora.data import DataError, load_task, partition, subset_train, task_of
from tests.conftest import write_tsv


@pytest.mark.parametrize("task,n_train,n_dev,pos", [("mrpc", 3668, 408, 2474), ("rte", 2490, 277, 1241)])
def test_bundled_glue_tasks_load_completely(task, n_train, n_dev, pos):
    data = load_task(task)
    assert len(data.train) == n_train and len(data.dev) == n_dev
    assert data.train.text_b is not None and data.num_labels == 2
    assert sum(data.train.labels) == pos  # MRPC: 2474 paraphrases; RTE: 1241 not_entailment


def test_bundled_sst2_loads_completely_as_single_sentences():
    data = load_task("sst2")
    assert len(data.train) == 67349 and len(data.dev) == 872  # the bundled README's counts
    assert data.train.text_b is None and data.label_names == ["0", "1"] and data.f1_label == 1
    assert sum(data.train.labels) == 37569 and sum(data.dev.labels) == 444  # positives (label 1)


def test_train_subset_is_one_seeded_draw_in_file_order_whatever_the_run_seed():
    full = load_task("sst2").train
    a = task_of(load_config(None, {"task": "sst2", "train_subset": 6000, "seed": 0}))
    b = task_of(load_config(None, {"task": "sst2", "train_subset": 6000, "seed": 2}))
    assert len(a.train) == 6000 and a.train.text_a == b.train.text_a and a.train.labels == b.train.labels
    assert len(a.dev) == 872  # the dev set is never cut
    assert 0.45 < sum(a.train.labels) / 6000 < 0.65  # a uniform draw keeps the label mix (55.8% positive)
    assert task_of(load_config(None, {"task": "sst2"})).train.text_a == full.text_a  # None: everything


def test_train_subset_keeps_distinct_examples_in_file_order(tmp_path):
    rows = [[f"s{i}", str(i % 2)] for i in range(100)]
    train = write_tsv(tmp_path / "t.tsv", ["text", "y"], rows)
    dev = write_tsv(tmp_path / "d.tsv", ["text", "y"], rows[:4])
    kept = subset_train(load_task(None, train, dev, ["text"], "y"), 30).train
    index = [int(t[1:]) for t in kept.text_a]
    assert len(set(index)) == 30 and index == sorted(index) and index != list(range(30))
    assert kept.labels == [i % 2 for i in index]  # each text keeps its own label


def test_train_subset_refuses_more_than_the_data_or_fewer_than_the_clients():
    with pytest.raises(DataError, match="--train-subset 5000: the training set of mrpc has 3668 examples"):
        subset_train(load_task("mrpc"), 5000)
    with pytest.raises(ConfigError, match="at least one example a client"):
        load_config(None, {"task": "mrpc", "train_subset": 50, "clients": 100})


def test_mrpc_reports_f1_of_the_paraphrase_class_and_rte_does_not():
    assert load_task("mrpc").f1_label == 1
    assert load_task("rte").f1_label is None


def test_rte_row_starting_with_a_bare_quote_is_kept_whole():
    data = load_task("rte")
    assert data.train.text_a[2164].startswith('"')


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task 'sst9'"):
        load_task("sst9")


def test_local_files_with_string_labels_and_single_sentences(tmp_path):
    train = write_tsv(tmp_path / "t.tsv", ["text", "y"], [["good", "pos"], ["bad", "neg"], ["fine", "pos"]])
    dev = write_tsv(tmp_path / "d.tsv", ["text", "y"], [["meh", "neg"]])
    data = load_task(None, train, dev, ["text"], "y")
    assert data.label_names == ["neg", "pos"] and data.train.labels == [1, 0, 1]
    assert data.train.text_b is None and data.f1_label is None


def test_jsonl_and_csv_files(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"a": "x", "b": "y", "label": 1}\n{"a": "p", "b": "q", "label": 0}\n')
    (tmp_path / "d.csv").write_text('a,b,label\n"hello, world",there,1\n')
    data = load_task("mine", tmp_path / "t.jsonl", tmp_path / "d.csv", ["a", "b"], "label")
    assert data.dev.text_a == ["hello, world"] and data.f1_label == 1


def test_malformed_row_names_its_line(tmp_path):
    train = tmp_path / "t.tsv"
    train.write_text("text\ty\nok\t1\nbroken row without tab\nok\t0\n")
    with pytest.raises(DataError, match=r"t\.tsv line 3: expected 2 fields, found 1"):
        load_task(None, train, train, ["text"], "y")


def test_unknown_dev_label_names_its_line(tmp_path):
    train = write_tsv(tmp_path / "t.tsv", ["text", "y"], [["a", "0"], ["b", "1"]])
    dev = write_tsv(tmp_path / "d.tsv", ["text", "y"], [["a", "0"], ["c", "7"]])
    with pytest.raises(DataError, match=r"d\.tsv line 3: unknown label '7'"):
        load_task(None, train, dev, ["text"], "y")


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_task(None, tmp_path / "nope.tsv", tmp_path / "nope.tsv", ["text"], "y")
    train = write_tsv(tmp_path / "t.tsv", ["text", "y"], [["a", "0"]])
    with pytest.raises(DataError, match="no column 'label'"):
        load_task(None, train, train, ["text"], "label")


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
@pytest.mark.parametrize("clients", [1, 7, 100])
def test_partition_covers_every_example_exactly_once_and_no_client_is_empty(method, clients):
    labels = load_task("mrpc").train.labels
    parts = partition(labels, clients, method, alpha=0.5, seed=3)
    assert len(parts) == clients
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(labels)))
    assert all(len(p) > 0 for p in parts)
    assert parts == partition(labels, clients, method, alpha=0.5, seed=3)  # seeded


def test_dirichlet_split_is_label_skewed_and_iid_is_not():
    labels = load_task("mrpc").train.labels
    share = sum(labels) / len(labels)

    def spread(parts):
        fr = [sum(labels[i] for i in p) / len(p) for p in parts if len(p) >= 10]
        return max(abs(f - share) for f in fr)

    assert spread(partition(labels, 20, "dirichlet", 0.1, 0)) > 0.3
    assert spread(partition(labels, 20, "iid", 0.5, 0)) < 0.15


def test_hugging_face_dataset_by_name_through_the_datasets_library(tmp_path):
    """A local dataset folder goes through the same datasets.load_dataset call as a hub name."""
    folder = tmp_path / "my_ds"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence,label\ngood film,pos\nbad film,neg\nfine film,pos\n")
    (folder / "validation.csv").write_text("sentence,label\nawful,neg\n")
    data = load_task(f"hf:{folder}", text_columns=["sentence"], label_column="label")
    assert data.label_names == ["neg", "pos"] and data.train.labels == [1, 0, 1] and data.dev.labels == [0]
    assert data.text_columns == ["sentence"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_task(f"hf:{folder}", text_columns=["text"], label_column="label")
    with pytest.raises(DataError, match="cannot load dataset"):
        load_task(f"hf:{tmp_path / 'nothing-here'}", text_columns=["sentence"], label_column="label")
