"""The prompt-embedding cache of --model flux / sd3 (pipelines.CachedTextEncoder): written batch by batch, read back
exactly, memory-mapped (loading it reads nothing; a batch reads its own rows), atomic."""

import psutil
import pytest
import torch

from infra import diffusers_models
from infra import pipelines


def fake_encoder(seq_len=6, dim=8, pooled_dim=4, dtype=torch.bfloat16):
    """A deterministic stand-in for a pipeline's encode_prompt: each prompt's tensors are seeded by its text."""
    return diffusers_models.HashTextEncoder(seq_len, dim, pooled_dim), dtype


def encode_with(encoder, dtype, calls=None):
    def encode(prompts):
        if calls is not None:
            calls.append(len(prompts))
        embeds, pooled = encoder(prompts)
        return embeds.to(dtype), pooled.to(dtype)
    return encode


def test_written_in_batches_and_read_back_exactly(tmp_path):
    encoder, dtype = fake_encoder()
    prompts = [f"prompt {i}" for i in range(10)] + [""]
    calls = []
    pipelines.CachedTextEncoder.write(tmp_path / "cache", prompts, encode_with(encoder, dtype, calls), batch=4)
    assert calls == [4, 4, 3]  # never more than a batch at once
    cached = pipelines.CachedTextEncoder(tmp_path / "cache")
    assert (cached.seq_len, cached.dim, cached.pooled_dim) == (6, 8, 4)
    query = ["prompt 7", "", "prompt 0", "prompt 7"]
    embeds, pooled = cached(query)
    expected_embeds, expected_pooled = encode_with(encoder, dtype)(query)
    assert embeds.dtype == torch.bfloat16
    assert torch.equal(embeds, expected_embeds) and torch.equal(pooled, expected_pooled)
    assert torch.equal(cached.uncond()[0], expected_embeds[1:2])
    with pytest.raises(KeyError, match="not embedded at start-up"):
        cached(["prompt 99"])
    assert not list(tmp_path.glob("cache.tmp*"))  # the temporary directory was renamed into place



def test_embedding_a_long_prompt_set_reports_progress_to_a_log(tmp_path, monkeypatch):
    """Without a terminal, a log line after each batch once the interval has passed (here at once), none after the
    last: how far T5 has got through a large prompt set, and when it will be done."""
    import functools
    from infra import progress
    monkeypatch.setattr(pipelines, "Progress", functools.partial(progress.Progress, interval=0))
    encoder, dtype = fake_encoder()
    lines = []
    pipelines.CachedTextEncoder.write(tmp_path / "cache", [f"p{i}" for i in range(10)], encode_with(encoder, dtype),
                                      batch=4, log=lines.append)
    assert [line.split(": ")[1].split(",")[0] for line in lines] == ["4/10 prompts", "8/10 prompts"]
    assert all(line.startswith("  embedding the prompts: ") and "ETA" in line for line in lines)


def test_progress_lines_come_at_most_every_interval_and_never_from_a_quiet_process(monkeypatch):
    import types
    from infra import progress
    clock = iter([0.0, 10.0, 30.0, 70.0, 80.0, 140.0, 200.0, 0.0, 0.0])  # the start, then one reading per update
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(time=lambda: next(clock)))  # this module's clock
    lines = []
    bar = progress.Progress(6, "work", "item", lines.append, interval=60)
    for _ in range(6):
        bar.update(1)
    # 60 s passed at the 3rd update (70 s) and again at the 5th (140 s); the 6th is the end: no line
    assert lines == ["  work: 3/6 items, 1:10 spent, ETA 1:10", "  work: 5/6 items, 2:20 spent, ETA 0:28"]
    quiet = []
    muted = progress.Progress(2, "work", "item", quiet.append, interval=0, quiet=True)
    muted.update(1)
    assert quiet == [] and progress.duration(3725) == "1:02:05"


def test_loading_maps_the_files_instead_of_reading_them(tmp_path):
    """256 MB of embeddings: opening the cache adds (almost) nothing to the process's resident memory, a batch of
    rows adds about its own size."""
    rows, seq_len, dim = 512, 512, 512  # 512 x 512 x 512 bf16 = 256 MB
    pipelines.CachedTextEncoder.write(
        tmp_path / "big", [f"p{i}" for i in range(rows)],
        lambda ps: (torch.ones(len(ps), seq_len, dim, dtype=torch.bfloat16), torch.ones(len(ps), 4)), batch=64)
    process = psutil.Process()
    before = process.memory_info().rss
    cached = pipelines.CachedTextEncoder(tmp_path / "big")
    opened = process.memory_info().rss
    embeds, _ = cached(["p3", "p400"])
    after = process.memory_info().rss
    assert (opened - before) < 16 * 2**20  # the 256 MB file is mapped, not read
    assert (after - before) < 32 * 2**20 and embeds.shape == (2, seq_len, dim) and embeds.float().mean() == 1.0


def test_a_finished_cache_is_not_overwritten_by_a_second_writer(tmp_path):
    encoder, dtype = fake_encoder()
    pipelines.CachedTextEncoder.write(tmp_path / "cache", ["a", "b"], encode_with(encoder, dtype))
    other = diffusers_models.HashTextEncoder(6, 8, 4)  # same shapes, other values: must not replace the first
    pipelines.CachedTextEncoder.write(tmp_path / "cache", ["a", "b"], lambda ps: tuple(t + 1 for t in other(ps)))
    embeds, _ = pipelines.CachedTextEncoder(tmp_path / "cache")(["a"])
    assert torch.equal(embeds, encode_with(encoder, dtype)(["a"])[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_the_cache_is_keyed_by_everything_that_changes_the_embeddings(tmp_path, monkeypatch):
    """Another model, weights, T5 length, prompt set or text-encoder dtype never reads a cache written for this one."""
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path))
    key = dict(model="flux", prompts=["a", "b"], max_sequence_length=512, source="/weights/FLUX.1-dev",
               dtype=torch.bfloat16)
    here = pipelines.prompt_cache_dir(**key)
    assert here.parent == tmp_path and here == pipelines.prompt_cache_dir(**key)
    for change in (dict(model="sd3"), dict(prompts=["a", "c"]), dict(prompts=["a"]), dict(max_sequence_length=256),
                   dict(source="/weights/other"), dict(dtype=torch.float16), dict(dtype=torch.float32)):
        assert pipelines.prompt_cache_dir(**{**key, **change}) != here, change


@pytest.mark.parametrize("which", ["embeds", "pooled"])
def test_non_finite_embeddings_are_never_cached(tmp_path, which):
    """A text encoder that overflows (T5 in fp16) gives inf / NaN for some prompts: the run stops with one line naming
    the first such prompt, and no cache (nor its temporary directory) is left for a later run to read."""
    encoder, dtype = fake_encoder()

    def encode(prompts):
        embeds, pooled = encode_with(encoder, dtype)(prompts)
        broken = embeds if which == "embeds" else pooled
        for row, p in enumerate(prompts):
            if p == "prompt 6":
                broken[row, -1] = float("inf") if which == "embeds" else float("nan")
        return embeds, pooled

    prompts = [f"prompt {i}" for i in range(8)]
    with pytest.raises(SystemExit, match=r"non-finite embeddings for 1 of the prompts 5-8 \(the first: 'prompt 6'\)"):
        pipelines.CachedTextEncoder.write(tmp_path / "cache", prompts, encode, batch=4)
    assert list(tmp_path.iterdir()) == []
