"""Feature store: write/read round trip, collation, the sharded stream (ranks, workers, exact resume),
validation of damaged stores, and the synthetic store's learnable structure. Tiny dims, seconds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lambda_eclipse.errors import UserError
from lambda_eclipse.features import (
    FeatureDataset,
    FeatureSample,
    FeatureStream,
    FeatureWriter,
    collate_features,
    format_report,
    load_all,
    read_index,
    read_zero_image,
    stored_source_ids,
    synthesize_features,
    validate_feature_store,
)
from lambda_eclipse.features.schema import token_subject_problem
from lambda_eclipse.features.synth import SUBJECT_NOUNS

DIM, MAX_LEN = 16, 12


def make_sample(i: int, g: torch.Generator, subjects: int | None = None) -> FeatureSample:
    length = int(torch.randint(6, MAX_LEN + 1, (1,), generator=g))
    count = i % 5 if subjects is None else subjects  # 0..4 subjects
    # subject k owns token 1 + k, and subject 0 also a second occurrence at the last real token before EOS
    token_subject = torch.full((length,), -1, dtype=torch.long)
    for k in range(count):
        token_subject[1 + k] = k
    if count and length - 2 > count:
        token_subject[length - 2] = 0
    return FeatureSample(
        caption=f"caption {i} – ünïcode ✓",
        token_states=torch.randn(length, DIM, generator=g),
        pooled_text=torch.randn(DIM, generator=g),
        subject_embeds=torch.randn(count, DIM, generator=g),
        token_subject=token_subject,
        target=torch.randn(DIM, generator=g),
        edge=torch.randn(DIM, generator=g) if i % 3 else None,
        source_id=f"src-{i}",
    )


def write_store(path: Path, n: int, shard_size: int = 7, seed: int = 0) -> list[FeatureSample]:
    g = torch.Generator().manual_seed(seed)
    samples = [make_sample(i, g) for i in range(n)]
    zero = torch.ones(DIM) / DIM**0.5
    with FeatureWriter(path, dim=DIM, max_text_len=MAX_LEN, shard_size=shard_size, zero_image=zero) as writer:
        for s in samples[:-1]:
            writer.add(s)
        writer.add(vars(samples[-1]))  # a plain dict works too
    return samples


def assert_same_sample(got: FeatureSample, want: FeatureSample) -> None:
    assert got.caption == want.caption and got.source_id == want.source_id
    for name in ("token_states", "pooled_text", "subject_embeds", "target"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name).half(), rtol=0, atol=0)
    assert torch.equal(got.token_subject, want.token_subject.long())
    assert (got.edge is None) == (want.edge is None)
    if want.edge is not None:
        assert torch.equal(got.edge, want.edge.half())


# ------------------------------------------------------------------------------------------ write / read
def test_round_trip_and_index(tmp_path: Path) -> None:
    samples = write_store(tmp_path / "s", 20, shard_size=7)
    index = read_index(tmp_path / "s")
    assert [s.num_samples for s in index.shards] == [7, 7, 6]
    assert (index.dim, index.max_text_len, index.dtype, index.num_samples) == (DIM, MAX_LEN, "float16", 20)
    dataset = FeatureDataset(tmp_path / "s")
    assert len(dataset) == 20
    for i in (0, 6, 7, 13, 19, -1):
        assert_same_sample(dataset[i], samples[i])
    with pytest.raises(IndexError):
        dataset[20]
    assert not list((tmp_path / "s").glob("*.tmp"))
    torch.testing.assert_close(read_zero_image(tmp_path / "s"), torch.ones(DIM) / DIM**0.5)
    # Few open files at a time: reads across shards stay correct when handles are evicted.
    few = FeatureDataset(tmp_path / "s")
    few.files.max_open = 1
    for i in (0, 19, 7, 1):
        assert_same_sample(few[i], samples[i])
    assert len(few.files._open) == 1


def test_fp16_storage_keeps_direction() -> None:
    # The documented reason fp16 is enough for every vector: cosine to the fp32 original is 1 - O(1e-7).
    x = torch.randn(64, 1280)
    cos = torch.nn.functional.cosine_similarity(x, x.half().float(), dim=-1)
    assert cos.min().item() > 0.99999


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(token_states=torch.randn(MAX_LEN + 1, DIM)), "tokens"),
        (dict(token_states=torch.randn(4, DIM + 1)), "token_states"),
        (dict(token_subject=torch.tensor([-1, 0, 1, -1, -1])), "token_subject"),  # subject 1 does not exist
        (dict(token_subject=torch.tensor([-1, -1, -1, -1, -1])), "token_subject"),  # subject 0 owns no token
        (dict(token_subject=torch.tensor([-1, 0, -1])), "token_subject"),  # not one entry per token
        (dict(target=torch.full((DIM,), float("nan"))), "NaN"),
        (dict(pooled_text=torch.full((DIM,), 1e6)), "fp16"),
    ],
)
def test_writer_rejects_bad_samples(tmp_path: Path, change: dict, message: str) -> None:
    sample = make_sample(1, torch.Generator().manual_seed(0), subjects=1)
    sample.token_states = sample.token_states[:5]
    sample.token_subject = torch.tensor([-1, 0, -1, -1, -1])
    for key, value in change.items():
        setattr(sample, key, value)
    with FeatureWriter(tmp_path / "s", dim=DIM, max_text_len=MAX_LEN) as writer:
        with pytest.raises(ValueError, match=message):
            writer.add(sample)


def test_append_resume_and_crash(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_store(root, 5, shard_size=4)
    with pytest.raises(UserError, match="append=True"):
        FeatureWriter(root, dim=DIM, max_text_len=MAX_LEN)
    with pytest.raises(UserError, match="dim"):
        FeatureWriter(root, dim=DIM + 1, max_text_len=MAX_LEN, append=True)
    with pytest.raises(UserError, match="another encoder"):
        FeatureWriter(root, dim=DIM, max_text_len=MAX_LEN, append=True, zero_image=-torch.ones(DIM))
    (root / ".tmp-shard-00009.safetensors-0badf00d").write_bytes(b"half a shard")  # left by a crash
    g = torch.Generator().manual_seed(1)
    with pytest.raises(RuntimeError):
        with FeatureWriter(root, dim=DIM, max_text_len=MAX_LEN, shard_size=4, append=True) as writer:
            assert not (root / ".tmp-shard-00009.safetensors-0badf00d").exists()
            for i in range(5, 11):  # commits one shard of 4, leaves 2 pending
                writer.add(make_sample(i, g))
            raise RuntimeError("builder died")
    index = read_index(root)
    assert [s.file for s in index.shards] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert stored_source_ids(root) == {f"src-{i}" for i in range(9)}  # the pending two are not committed
    assert validate_feature_store(root).ok


# ------------------------------------------------------------------------------------------------ collate
def test_collate_pads_to_longest_in_batch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    samples = [make_sample(i, g) for i in range(6)]
    samples[0].token_states = samples[0].token_states[:3]
    samples[0].token_subject = samples[0].token_subject[:3]  # sample 0 has no subjects anyway
    batch = collate_features(samples, max_text_len=MAX_LEN)
    longest = max(s.num_tokens for s in samples)
    assert batch["token_states"].shape == (6, longest, DIM) and batch["token_states"].dtype == torch.float32
    assert batch["attention_mask"].sum(1).tolist() == [s.num_tokens for s in samples]
    assert batch["subject_embeds"].shape == (6, 4, DIM)
    assert batch["subject_mask"].sum(1).tolist() == [s.num_subjects for s in samples]
    assert batch["has_edge"].tolist() == [s.edge is not None for s in samples]
    for b, s in enumerate(samples):
        torch.testing.assert_close(batch["token_states"][b, : s.num_tokens], s.token_states)
        assert not batch["token_states"][b, s.num_tokens :].any()
        torch.testing.assert_close(batch["subject_embeds"][b, : s.num_subjects], s.subject_embeds)
        assert batch["token_subject"][b, : s.num_tokens].tolist() == s.token_subject.tolist()
        assert (batch["token_subject"][b, s.num_tokens :] == -1).all()  # padding binds nothing
        torch.testing.assert_close(batch["target"][b], s.target)
        if s.edge is None:
            assert not batch["edge"][b].any()
    assert batch["caption"] == [s.caption for s in samples]
    with pytest.raises(ValueError, match="max_text_len"):
        collate_features(samples, max_text_len=2)
    only_text = collate_features([make_sample(0, g, subjects=0)])
    assert only_text["subject_embeds"].shape == (1, 1, DIM) and not only_text["subject_mask"].any()


# ------------------------------------------------------------------------------------------------- stream
def ids(batches: list[dict]) -> list[str]:
    return [s for b in batches for s in b["source_id"]]


def test_stream_batches_equal_collated_samples(tmp_path: Path) -> None:
    write_store(tmp_path / "s", 40, shard_size=9)
    dataset = FeatureDataset(tmp_path / "s")
    by_id = {dataset[i].source_id: i for i in range(len(dataset))}
    stream = FeatureStream(tmp_path / "s", batch_size=6, chunk_size=4, buffer_size=8, seed=3)
    for batch in stream:
        want = collate_features([dataset[by_id[s]] for s in batch["source_id"]], MAX_LEN)
        for key, value in want.items():
            assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value, key


def test_stream_splits_ranks_and_shuffles_by_epoch(tmp_path: Path) -> None:
    write_store(tmp_path / "s", 60, shard_size=11)
    kw = dict(batch_size=4, chunk_size=5, buffer_size=10, seed=7, num_workers=2)
    ranks = [FeatureStream(tmp_path / "s", rank=r, world_size=2, **kw) for r in range(2)]
    epoch0 = [list(r) for r in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == len(ranks[0]) > 0  # equal step counts for DDP
    seen = ids(epoch0[0]) + ids(epoch0[1])
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, across ranks
    assert len(seen) >= 60 - 2 * 2 * (4 - 1) - 4 * 2  # only per-worker tails and rank equalisation are dropped
    assert [b["batch_index"] for b in epoch0[0]] == list(range(len(epoch0[0])))
    again = ids(list(FeatureStream(tmp_path / "s", rank=0, world_size=2, **kw)))
    assert again == ids(epoch0[0])  # same seed and epoch: same order
    ranks[0].set_epoch(1)
    assert ids(list(ranks[0])) != ids(epoch0[0])
    ordered = FeatureStream(tmp_path / "s", batch_size=4, chunk_size=100, shuffle=False)
    assert ids(list(ordered)) == [f"src-{i}" for i in range(60)]


def test_dataloader_workers_match_in_process_order(tmp_path: Path) -> None:
    write_store(tmp_path / "s", 70, shard_size=13)
    stream = FeatureStream(tmp_path / "s", batch_size=5, num_workers=2, chunk_size=6, buffer_size=12, seed=1)
    in_process = list(stream)
    loaded = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert [b["batch_index"] for b in loaded] == list(range(len(stream)))
    assert ids(loaded) == ids(in_process)
    wrong = iter(DataLoader(FeatureStream(tmp_path / "s", batch_size=5, num_workers=3), batch_size=None, num_workers=2))
    with pytest.raises(UserError, match="num_workers"):
        next(wrong)
    wrong._shutdown_workers()  # now, not when the traceback is collected (that waits out worker timeouts)


@pytest.mark.parametrize("workers, stop_after", [(0, 3), (2, 4), (2, 5)])
def test_exact_resume(tmp_path: Path, workers: int, stop_after: int) -> None:
    write_store(tmp_path / "s", 70, shard_size=13)
    kw = dict(batch_size=5, num_workers=workers, chunk_size=6, buffer_size=12, seed=2)
    loader = lambda s: DataLoader(s, batch_size=None, num_workers=workers)  # noqa: E731
    full = FeatureStream(tmp_path / "s", **kw)
    full.set_epoch(1)
    reference = list(loader(full))
    first = FeatureStream(tmp_path / "s", **kw)
    first.set_epoch(1)
    consumed = []
    for batch in loader(first):
        consumed.append(batch)
        if len(consumed) == stop_after:
            break
    state = first.state_dict(after=consumed[-1])
    assert state["epoch"] == 1 and state["batches_seen"] == stop_after
    resumed = FeatureStream(tmp_path / "s", **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer's epoch loop calling set_epoch keeps the resume point
    assert len(resumed) == len(full) - stop_after
    assert ids(consumed + list(loader(resumed))) == ids(reference)
    # The end of an epoch resumes at the start of the next one.
    done = FeatureStream(tmp_path / "s", **kw)
    done.load_state_dict(full.state_dict(after=reference[-1]))
    assert done.epoch == 2 and done.start_batch == 0
    with pytest.raises(UserError, match="batch_size"):
        FeatureStream(tmp_path / "s", **{**kw, "batch_size": 4}).load_state_dict(state)


def test_stream_too_small_store_is_a_user_error(tmp_path: Path) -> None:
    write_store(tmp_path / "s", 5)
    with pytest.raises(UserError, match="batch_size"):
        FeatureStream(tmp_path / "s", batch_size=8)


# --------------------------------------------------------------------------------------------- validation
def _tensor_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]


def test_validate_finds_damaged_shards(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_store(root, 40, shard_size=8)  # shards 0..4
    report = validate_feature_store(root)
    assert report.ok and report.num_samples == 40
    assert report.subjects_histogram == {k: 8 for k in range(5)}
    assert report.bytes_per_sample > 0 and "OK" in format_report(report)

    shard = lambda i: root / f"shard-0000{i}.safetensors"  # noqa: E731
    data = shard(0).read_bytes()
    shard(0).write_bytes(data[: len(data) - 100])  # truncated
    shard(1).write_bytes(b"\xff" * 8 + shard(1).read_bytes()[8:])  # bad header
    raw = bytearray(shard(2).read_bytes())
    at = _tensor_offset(shard(2), "target")
    raw[at : at + 2] = struct.pack("<e", float("nan"))
    shard(2).write_bytes(bytes(raw))  # NaN, same size
    index = json.loads((root / "index.json").read_text())
    index["shards"][3]["num_samples"] = 9  # the index disagrees with the shard
    (root / "index.json").write_text(json.dumps(index))
    (root / "shard-00099.safetensors").write_bytes(b"orphan")

    report = validate_feature_store(root)
    bad = {p.file: p.reason for p in report.bad_shards}
    assert set(bad) == {shard(i).name for i in range(4)}
    assert "truncated" in bad[shard(0).name]
    assert "header" in bad[shard(1).name]
    assert "NaN" in bad[shard(2).name]
    assert "shape" in bad[shard(3).name]
    assert report.num_samples == 8 and not report.ok
    assert report.unlisted_files == ["shard-00099.safetensors"]
    text = format_report(report)
    assert "4 bad shard(s)" in text and shard(2).name in text


def test_validate_requires_the_zero_image(tmp_path: Path) -> None:
    write_store(tmp_path / "s", 10)
    (tmp_path / "s" / "zero_image.safetensors").unlink()
    report = validate_feature_store(tmp_path / "s")
    assert not report.ok and not report.bad_shards and "zero_image" in report.zero_image_problem
    with pytest.raises(UserError, match="zero_image"):
        read_zero_image(tmp_path / "s")


def test_user_errors_for_missing_store(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        validate_feature_store(tmp_path / "nowhere")
    with pytest.raises(UserError, match="index.json"):
        validate_feature_store(tmp_path)


@pytest.mark.parametrize(
    "version, message",
    [(1, "uses schema version 1 (one span per subject); rebuild it with this version of lambda-eclipse"),
     (3, "uses schema version 3, newer than this lambda-eclipse reads (2); upgrade lambda-eclipse")],
)
def test_other_schema_versions_are_refused_in_one_line(tmp_path: Path, version: int, message: str) -> None:
    root = tmp_path / "s"
    write_store(root, 4)
    index = json.loads((root / "index.json").read_text())
    index["version"] = version
    (root / "index.json").write_text(json.dumps(index))
    for open_store in (read_index, FeatureDataset, validate_feature_store, lambda d: FeatureStream(d, batch_size=2)):
        with pytest.raises(UserError) as err:
            open_store(root)
        assert str(err.value) == f"feature store {str(root)!r} {message}"  # one line, naming the store
    with pytest.raises(UserError, match=f"schema version {version}"):
        FeatureWriter(root, dim=DIM, max_text_len=MAX_LEN, append=True)  # nor appended to


def test_token_subject_problems_name_the_sample() -> None:
    # three samples back to back: 3, 4 and 2 tokens; 0, 2 and 1 subjects
    tokens, subjects = torch.tensor([3, 4, 2]), torch.tensor([0, 2, 1])
    good = torch.tensor([-1, -1, -1, -1, 0, 1, 0, -1, 0])
    assert token_subject_problem(good, tokens, subjects) is None
    out_of_range = good.clone()
    out_of_range[1] = 0  # sample 0 has no subjects
    assert token_subject_problem(out_of_range, tokens, subjects) == (
        "token_subject holds 0 at token 1 of sample 0; it must be -1 (no subjects)")
    unowned = good.clone()
    unowned[5] = 0  # subject 1 of sample 1 loses its only token
    assert token_subject_problem(unowned, tokens, subjects) == (
        "subject 1 of sample 1 owns no token in token_subject; bind it to its word")
    foreign = good.clone()
    foreign[8] = 1  # sample 2 has one subject: 1 would point at another sample's subject row
    assert "at token 1 of sample 2" in token_subject_problem(foreign, tokens, subjects)


def test_validate_finds_a_bad_subject_index(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_store(root, 14, shard_size=7)
    shard = root / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    at = _tensor_offset(shard, "token_subject")
    raw[at] = 100  # int8 owner of the first token (BOS of sample 0): a subject that does not exist
    shard.write_bytes(bytes(raw))
    report = validate_feature_store(root)
    assert [p.file for p in report.bad_shards] == [shard.name]
    assert "token_subject holds 100 at token 0 of sample 0" in report.bad_shards[0].reason
    assert report.num_samples == 7


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_store_is_valid_and_bound_to_words(tmp_path: Path) -> None:
    synthesize_features(tmp_path / "a", 200, dim=32, max_text_len=32, seed=5, shard_size=64)
    synthesize_features(tmp_path / "b", 200, dim=32, max_text_len=32, seed=5, shard_size=64)
    a, b = (load_file(tmp_path / d / "shard-00000.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seeds, same store
    report = validate_feature_store(tmp_path / "a")
    assert report.ok and set(report.subjects_histogram) == {1, 2, 3, 4}
    dataset = FeatureDataset(tmp_path / "a")
    for i in range(20):
        s = dataset[i]
        words = ["<bos>"] + s.caption.split() + ["<eos>"]
        assert len(words) == s.num_tokens
        owned = s.token_subject.tolist()
        assert set(owned) - {-1} == set(range(s.num_subjects))  # every subject owns tokens
        for k in range(s.num_subjects):  # and they are exactly a subject noun
            assert " ".join(w for w, o in zip(words, owned) if o == k) in SUBJECT_NOUNS


def _ridge_cosine(x_train, y_train, x_test, y_test, alpha: float = 1e-2) -> float:
    x_train, x_test = (torch.cat([x, torch.ones(len(x), 1)], 1) for x in (x_train, x_test))
    w = torch.linalg.solve(x_train.T @ x_train + alpha * torch.eye(x_train.shape[1]), x_train.T @ y_train)
    return torch.nn.functional.cosine_similarity(x_test @ w, y_test, dim=-1).mean().item()


def test_synthetic_subjects_carry_information_text_lacks(tmp_path: Path) -> None:
    # A linear probe: predicting the target from text alone vs text + subject embeddings + edge.
    dim = 32
    synthesize_features(tmp_path / "train", 3000, dim=dim, max_text_len=32, seed=0)
    synthesize_features(tmp_path / "val", 500, dim=dim, max_text_len=32, seed=1)

    def features(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block = load_all(path, dtype=torch.float32)
        n = len(block)
        owner = torch.repeat_interleave(torch.arange(n), block.subject_offsets.diff())
        subjects = torch.zeros(n, dim).index_add_(0, owner, block.subject_embeds)
        edge = torch.zeros(n, dim)
        has = block.edge_index >= 0
        edge[has] = block.edge[block.edge_index[has]]
        text = block.pooled_text
        return text, torch.cat([text, subjects, edge], 1), block.target

    text_tr, full_tr, y_tr = features(tmp_path / "train")
    text_va, full_va, y_va = features(tmp_path / "val")
    text_only = _ridge_cosine(text_tr, y_tr, text_va, y_va)
    with_subjects = _ridge_cosine(full_tr, y_tr, full_va, y_va)
    assert with_subjects > text_only + 0.15, (text_only, with_subjects)
    assert with_subjects > 0.85
