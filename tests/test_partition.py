"""The partitions (hlora.data.partition), their options, their refusals, and ``hlora partition-stats``."""

import numpy as np
import pytest

from hlora.config import PARTITIONS, load_config
from hlora.data import PARTITIONS as DATA_PARTITIONS
from hlora.data import PartitionError, load_task, partition
from hlora.data.partition import size_skew
from tests.conftest import write_tsv
from tests.test_cli import run_cli

#: 10 labels of unequal frequency, 400 examples
LABELS = np.random.default_rng(5).choice(10, size=400, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum()).tolist()
METHODS = ["iid", "dirichlet", "pathological", "shard", "size"]


def test_the_config_and_data_name_the_same_methods():
    assert PARTITIONS == DATA_PARTITIONS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("clients", [1, 7, 40])
def test_every_partition_is_complete_disjoint_seeded_and_has_no_empty_client(method, clients):
    k = max(2, -(-10 // clients))  # pathological: enough labels a client to hold all 10
    parts = partition(LABELS, clients, method, seed=3, classes_per_client=k)
    assert len(parts) == clients
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(LABELS)))  # complete and disjoint
    assert all(len(p) > 0 for p in parts)
    assert parts == partition(LABELS, clients, method, seed=3, classes_per_client=k)  # same seed, same split
    if clients > 1:
        assert parts != partition(LABELS, clients, method, seed=4, classes_per_client=k)


@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("clients", [4, 10, 25])
def test_pathological_gives_each_client_at_most_k_labels(k, clients):
    if clients * k < 10:
        with pytest.raises(PartitionError, match="cannot hold all 10 labels"):
            partition(LABELS, clients, "pathological", classes_per_client=k)
        return
    parts = partition(LABELS, clients, "pathological", seed=1, classes_per_client=k)
    assert sorted(i for p in parts for i in p) == list(range(len(LABELS)))
    held = [len({LABELS[i] for i in p}) for p in parts]
    assert max(held) <= k and min(held) >= 1
    if k == 1:
        assert held == [1] * clients


def test_pathological_on_the_bundled_mrpc():
    labels = load_task("mrpc").train.labels
    parts = partition(labels, 20, "pathological", classes_per_client=1, seed=0)
    assert all(len({labels[i] for i in p}) == 1 for p in parts)
    assert sorted(i for p in parts for i in p) == list(range(len(labels)))


def test_shard_gives_each_client_its_shards_of_label_sorted_data():
    parts = partition(LABELS, 20, "shard", shards_per_client=2, seed=0)
    assert all(len({LABELS[i] for i in p}) <= 4 for p in parts)  # 2 shards, each across at most 2 labels
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] - sizes[0] <= 2  # 40 shards of 10 examples each
    with pytest.raises(PartitionError, match="above the 400 training examples"):
        partition(LABELS, 100, "shard", shards_per_client=5)


def test_size_skew_sizes_follow_the_power_law_draw_and_labels_stay_iid():
    parts = partition(LABELS, 20, "size", seed=2, size_exponent=1.0)
    sizes = size_skew(len(LABELS), 20, 1.0, 2)
    assert [len(p) for p in parts] == sizes and sum(sizes) == len(LABELS) and min(sizes) >= 1
    w = 1.0 + np.random.default_rng([2, 2]).pareto(1.0, size=20)  # the draw, as documented
    expected = 1 + (len(LABELS) - 20) * w / w.sum()
    assert np.all(np.abs(np.array(sizes) - expected) < 1.0)
    assert max(sizes) > 3 * np.median(sizes)  # skewed
    big = max(parts, key=len)  # the largest client's label mix is near the federation's
    share = np.bincount([LABELS[i] for i in big], minlength=10) / len(big)
    assert np.abs(share - np.bincount(LABELS, minlength=10) / len(LABELS)).max() < 0.12
    heavier = size_skew(len(LABELS), 20, 0.5, 2)
    assert np.std(heavier) > np.std(size_skew(len(LABELS), 20, 3.0, 2))


def test_natural_gives_one_client_per_value():
    groups = ["b", "a", "c", "a", "b", "b"]
    parts = partition([0, 1, 0, 1, 0, 1], 3, "natural:site", groups=groups)
    assert parts == [[1, 3], [0, 4, 5], [2]]  # sorted values a, b, c, as flwr-datasets' NaturalIdPartitioner
    with pytest.raises(PartitionError, match="--clients 4 is more than the 3 distinct values"):
        partition([0] * 6, 4, "natural:site", groups=groups)


def test_the_first_partitions_are_the_ones_runs_already_used():
    """iid and dirichlet draw exactly as before the new methods (old runs resume on the same split)."""
    labels = load_task("mrpc").train.labels
    rng = np.random.default_rng(0)
    old_iid = [sorted(p.tolist()) for p in np.array_split(rng.permutation(len(labels)), 7)]
    assert partition(labels, 7, "iid", seed=0) == old_iid


@pytest.fixture
def site_files(tmp_path):
    rows = [[f"text {i}", str(i % 3), f"site{i % 4}"] for i in range(24)]
    train = write_tsv(tmp_path / "train.tsv", ["text", "label", "site"], rows)
    dev = write_tsv(tmp_path / "dev.tsv", ["text", "label", "site"], rows[:6])
    return ["--train", str(train), "--dev", str(dev), "--text-columns", "text", "--label-column", "label"]


def test_natural_partition_reads_the_column_of_the_train_file(site_files, tmp_path):
    overrides = dict(zip([a.lstrip("-").replace("-", "_") for a in site_files[::2]], site_files[1::2]))
    cfg = load_config(None, {**overrides, "clients": 4, "per_round": 2, "partition": "natural:site"})
    task = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column)
    parts = cfg.client_parts(task)
    assert parts == [list(range(s, 24, 4)) for s in range(4)]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--partition", "pathological", "--classes-per-client", "4"],
         "--classes-per-client 4 is above the 3 labels of the training set"),
        (["--partition", "natural:author"], "--partition natural:author:"),
        (["--partition", "natural:site", "--clients", "5"],
         "--clients 5 is more than the 4 distinct values of column 'site'; use --clients 4"),
        (["--partition", "shard", "--clients", "20", "--shards-per-client", "2"],
         "20 clients x 2 shards is above the 24 training examples"),
        (["--partition", "natural:"], "--partition must be one of iid, dirichlet, pathological, shard, size"),
        (["--partition", "label"], "--partition must be one of"),
        (["--classes-per-client", "0"], "--classes-per-client must be at least 1, got 0"),
        (["--shards-per-client", "0"], "--shards-per-client must be at least 1, got 0"),
        (["--size-exponent", "0"], "--size-exponent (the power law's) must be > 0"),
    ],
)
def test_bad_partition_parameters_are_one_line_and_exit_2(argv, message, site_files, capsys, tmp_path):
    clients = [] if "--clients" in argv else ["--clients", "4"]
    argv = [*site_files, *clients, "--per-round", "2", *argv, "--out", str(tmp_path / "out")]
    code, text = run_cli(["run", *argv], capsys)
    assert code == 2, text
    assert message in " ".join(text.split())
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_natural_column_names_the_columns(site_files, capsys, tmp_path):
    code, text = run_cli(["partition-stats", str(_config(tmp_path, site_files)), "--partition", "natural:author"],
                         capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "no column 'author' in the header (columns: text, label, site)" in " ".join(text.split())


def _config(tmp_path, site_files):
    args = dict(zip([a.lstrip("-").replace("-", "_") for a in site_files[::2]], site_files[1::2]))
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{k}: '{v}'\n" for k, v in args.items()) + "clients: 4\nper_round: 2\n")
    return path


@pytest.mark.parametrize("method", ["dirichlet", "natural:site", "pathological"])
def test_partition_stats_prints_every_client_and_writes_partition_png(method, site_files, capsys, tmp_path):
    config = _config(tmp_path, site_files)
    code, text = run_cli(["partition-stats", str(config), "--partition", method, "--out", str(tmp_path / "fig")],
                         capsys)
    assert code in (0, None), text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["client", "size"])
    rows = [line.split() for line in lines[header + 1: header + 5]]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert sum(int(r[1]) for r in rows) == 24
    assert all(int(r[1]) == sum(map(int, r[2:5])) for r in rows)  # size = its label counts (3 labels)
    assert "4 clients, 24 examples" in text
    png = tmp_path / "fig" / "partition.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_partition_stats_of_a_run_directory_writes_into_it(site_files, capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(_config(tmp_path, site_files).read_text() + "partition: size\nseed: 3\n")
    code, text = run_cli(["partition-stats", str(run)], capsys)
    assert code in (0, None), text
    assert (run / "partition.png").is_file()
    (tmp_path / "empty").mkdir()
    code, text = run_cli(["partition-stats", str(tmp_path / "empty")], capsys)
    assert code == 2 and "not a run directory (no config.yaml)" in text and len(text.strip().splitlines()) == 1


def test_a_run_trains_on_a_new_partition(tiny_args, capsys, tmp_path):
    args = list(tiny_args)
    args[args.index("--rounds") + 1] = "1"
    code, text = run_cli(["run", *args, "--partition", "pathological", "--classes-per-client", "1",
                          "--out", str(tmp_path / "r")], capsys)
    assert code in (0, None), text
    assert (tmp_path / "r" / "metrics.jsonl").is_file()


def test_a_flower_node_takes_its_share_of_the_same_split():
    from hlora.engine.flower.settings import NodeConfigError, node_examples, node_settings, run_settings

    cfg, _ = run_settings({"partition": "shard", "shards-per-client": 3, "clients": 5, "per-round": 5})
    task = load_task("mrpc")
    node = node_settings({"rank": 4, "partition-id": 2, "num-partitions": 5}, cfg)
    assert node_examples(node, cfg, task).labels == [task.train.labels[i] for i in cfg.client_parts(task, 5)[2]]
    cfg, _ = run_settings({"partition": "pathological", "classes-per-client": 3})
    with pytest.raises(NodeConfigError, match="node-config: --classes-per-client 3 is above the 2 labels"):
        node_examples(node, cfg, task)
