"""Several processes train like one: 2 gloo ranks x batch B against 1 process x batch 2B (issue 5).

The workers are spawned processes on this CPU; gloo stands in for NCCL. With --bn sync (every
BatchNorm over the global batch) and the noise scales at 0 (the noise streams are per rank by
design), a step of 2 ranks must give the single process's loss, parameters, queue and bank.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastsynth import dist
from fastsynth.config import Config
from fastsynth.data.loaders import epoch_loader
from fastsynth.engine import precision, ssl_step
from fastsynth.model import SynthSSL
from tinydata import tiny_folder

GLOBAL_B, STEPS = 8, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(method: str, bn: str = "sync") -> Config:
    return Config(method=method, arch="resnet18", image_size=32, batch_size=GLOBAL_B, queue_size=32, bank_size=16,
                  moco_dim=16, simsiam_dim=32, decoder_width=16, sigma_g=0.0, sigma_v=0.0, moco_momentum=0.9,
                  bn=bn, lr=0.5).validate()


def _batches():
    g = torch.Generator().manual_seed(123)
    return [tuple(torch.randn(GLOBAL_B, 3, 32, 32, generator=g) for _ in range(3)) for _ in range(STEPS)]


def _train(cfg: Config, steps: int = STEPS) -> dict:
    """`steps` steps of ssl_step on this rank's rows of the fixed global batches; the state after
    the first step and after the last."""
    from fastsynth.train import _distribute
    torch.manual_seed(0)
    model = SynthSSL(cfg)
    world, rank = dist.world(), dist.rank()
    if world > 1:
        _distribute(model, cfg, torch.device("cpu"))
    else:
        # The single process normalises with GlobalBatchNorm's arithmetic too (float64 sums). At
        # initialisation the decoder's images are nearly flat, so some BatchNorm layers see a
        # variance close to 0 and their gradient amplifies rounding: torch's float32 BatchNorm
        # and the float64 sums then differ by ~1 % in the first layers' gradients, which says
        # nothing about the distribution. test_global_batchnorm_equals_batchnorm compares the
        # two arithmetics on well-conditioned data.
        dist.sync_batchnorm(model, torch.device("cpu"))
        for m in model.modules():
            if isinstance(m, dist.GlobalBatchNorm):
                m.own_math = True
    step_model = dist.ddp(model, torch.device("cpu")) if world > 1 else model
    opt = torch.optim.SGD(model.method.param_groups(cfg.effective_lr(), 1e-4), lr=cfg.effective_lr(), momentum=0.9)
    dec_opt = torch.optim.SGD(model.synth.decoder.parameters(), lr=0.1, momentum=0.9)
    autocast, scaler = precision(cfg, torch.device("cpu"))
    b = GLOBAL_B // world
    losses, first = [], None
    model.train()
    for step, batch in enumerate(_batches()[:steps]):
        local = tuple(t[rank * b:(rank + 1) * b] for t in batch)
        good, loss, parts, _, _ = ssl_step(step_model, model, opt, dec_opt, scaler, autocast, local,
                                           seed=step, finite=lambda loss: True)
        assert good
        vals = torch.stack([loss.detach(), parts["l_c"].detach(), parts["l_r"].detach(), parts["l_cp"].detach()])
        if world > 1:  # each rank's loss is the mean over its rows: the global mean is their mean
            torch.distributed.all_reduce(vals)
            vals /= world
        losses.append(vals)
        if step == 0:
            first = {k: v.clone() for k, v in model.state_dict().items()}
    return {"losses": torch.stack(losses), "first": first,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _rank_main(rank: int, world: int, port: int, out: str, case, *args) -> None:
    """One spawned rank: join a gloo group as torchrun would set it up, save case(*args)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init(torch.device("cpu"), timeout_min=3)
    try:
        torch.save(case(*args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.shutdown()


def _spawn(tmp_path, case, *args, world: int = 2) -> list:
    """case(*args) on each of `world` gloo ranks; their results in rank order."""
    mp.start_processes(_rank_main, args=(world, _free_port(), str(tmp_path), case, *args), nprocs=world,
                       start_method="spawn", join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _train_case(method: str, bn: str) -> dict:
    return _train(_cfg(method, bn))


@pytest.mark.parametrize("method", ["mocov2", "simsiam"])
def test_two_ranks_equal_one_process_of_twice_the_batch(method, tmp_path):
    ranks = _spawn(tmp_path, _train_case, method, "sync")
    torch.set_num_threads(2)
    single = _train(_cfg(method, "sync"), steps=1)
    # After several steps every rank holds the same model, queue and bank, bit for bit.
    for name, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][name]), name
    torch.testing.assert_close(ranks[0]["losses"], ranks[1]["losses"])
    # One step of 2 ranks x B equals one step of 1 process x 2B, to float tolerance: the terms of
    # Eq. 8, every parameter and BatchNorm statistic after the update, the queue (both ranks'
    # keys, in rank order) and the bank's rows and streaming statistics. (Later steps drift
    # apart by rounding amplified through nearly flat decoder images; see _train.)
    torch.testing.assert_close(ranks[0]["losses"][:1], single["losses"], rtol=1e-5, atol=1e-6)
    init = SynthSSL(_cfg(method, "sync")).state_dict()
    moved = 0
    for name, v in single["first"].items():
        got = ranks[0]["first"][name]
        if v.is_floating_point():
            torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
            moved += int(not torch.allclose(init[name], v))
        else:
            assert torch.equal(got, v), name
    assert moved > 10  # the comparison is between updated models, not two copies of the initialisation
    if method == "mocov2":
        assert int(single["first"]["method.queue_ptr"]) == GLOBAL_B
    assert int(single["first"]["synth.bank.count"]) == GLOBAL_B
    assert int(ranks[0]["state"]["synth.bank.count"]) == STEPS * GLOBAL_B  # rows seen: the global batches


def _bn_case() -> dict:
    """A BatchNorm2d used twice in one graph (as the encoder is), on this rank's rows."""
    torch.manual_seed(0)
    x, y, c = torch.randn(8, 4, 5, 5) * 3 + 1, torch.randn(8, 4, 5, 5), torch.randn(8, 4, 5, 5)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    net = dist.sync_batchnorm(nn.Sequential(bn), torch.device("cpu"))
    b = 8 // dist.world()
    rows = slice(dist.rank() * b, (dist.rank() + 1) * b)
    xl = x[rows].clone().requires_grad_(True)
    loss = ((net(xl) * c[rows]).sum() + net(y[rows]).square().sum()) / 8  # this rank's share of the sum
    loss.backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    gx = torch.zeros_like(x)
    gx[rows] = xl.grad
    if dist.world() > 1:
        torch.distributed.all_reduce(grads)
        torch.distributed.all_reduce(gx)
    return {"grads": grads, "gx": gx, "running": torch.cat([bn.running_mean, bn.running_var])}


def test_global_batchnorm_equals_batchnorm(tmp_path):
    ranks = _spawn(tmp_path, _bn_case)
    single = _bn_case()  # plain nn.BatchNorm2d over all 8 rows
    for res in ranks:
        for k in ("grads", "gx", "running"):
            torch.testing.assert_close(res[k], single[k], rtol=1e-5, atol=1e-6)


def _shuffle_case() -> dict:
    torch.manual_seed(0)
    rank = dist.rank()
    x = torch.randn(dist.world() * 6, 5)[rank * 6:(rank + 1) * 6]
    linear = nn.Linear(5, 3)
    bn = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    return {"x": x, "linear": dist.shuffled_keys(linear, x), "linear_direct": linear(x).detach(),
            "bn": dist.shuffled_keys(bn, x), "bn_direct": bn(x).detach(),
            "gathered": dist.gather(x), "offset": torch.tensor(dist.row_offset(6))}


def test_shuffle_bn_returns_each_rank_its_own_keys(tmp_path):
    ranks = _spawn(tmp_path, _shuffle_case)
    for r, res in enumerate(ranks):
        # Without BatchNorm the shuffle is invisible: each rank gets exactly its own rows back.
        torch.testing.assert_close(res["linear"], res["linear_direct"])
        # With BatchNorm the statistics come from a mixed batch, so the keys differ.
        assert not torch.allclose(res["bn"], res["bn_direct"], atol=1e-3)
        torch.testing.assert_close(res["gathered"], torch.cat([ranks[0]["x"], ranks[1]["x"]]))
        assert int(res["offset"]) == 6 * r


def _flops_case() -> dict:
    """train's one-off FLOP count fails on rank 1 only (as an out-of-memory would): it must
    issue no collective, so rank 0's count cannot wait for rank 1, and the next collective pairs up."""
    from fastsynth import profile
    from fastsynth.engine import step_flops
    if dist.rank() == 1:
        def fail(*args, **kwargs):
            raise RuntimeError("simulated out of memory")
        profile.count_flops = fail  # this spawned process only
    batch = tuple(t[:GLOBAL_B // 2] for t in _batches()[0])
    n = step_flops(_cfg("mocov2", bn="shuffle"), torch.device("cpu"), batch)
    with dist.local():
        inside = dist.world()
    x = torch.full((2,), float(dist.rank()))
    return {"flops": torch.tensor(-1 if n is None else n), "gathered": dist.gather(x),
            "inside": torch.tensor(inside), "after": torch.tensor(dist.world())}


def test_flop_count_failing_on_one_rank_leaves_the_others_free(tmp_path):
    ranks = _spawn(tmp_path, _flops_case)
    assert int(ranks[0]["flops"]) > 1e8 and int(ranks[1]["flops"]) == -1
    for res in ranks:
        torch.testing.assert_close(res["gathered"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert int(res["inside"]) == 1 and int(res["after"]) == 2


def _stop_case() -> dict:
    """A signal that reached one rank only (rank 1: SIGTERM; then rank 0: SIGINT): every rank
    reports the same one. And a channels-last batch gathered keeps its values and its layout."""
    import signal

    from fastsynth import train
    from fastsynth.guard import StopRequest
    stop = StopRequest()
    stop.signum = signal.SIGTERM if dist.rank() == 1 else None
    term = train.agreed_signal(stop)
    stop.signum = signal.SIGINT if dist.rank() == 0 else None
    interrupt = train.agreed_signal(stop)
    x = (torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) + 1000 * dist.rank())
    g = dist.gather(x.contiguous(memory_format=torch.channels_last))
    return {"term": torch.tensor(term), "interrupt": torch.tensor(interrupt), "gathered": g,
            "channels_last": torch.tensor(g.is_contiguous(memory_format=torch.channels_last))}


def test_a_signal_on_one_rank_is_every_ranks_and_gathers_keep_the_layout(tmp_path):
    """The ranks that were not signalled used to crash naming the signal (None is not a valid
    Signals) after the coordinated stop and checkpoint: torchrun reported a failed job."""
    import signal
    ranks = _spawn(tmp_path, _stop_case)
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for res in ranks:
        assert int(res["term"]) == signal.SIGTERM and int(res["interrupt"]) == signal.SIGINT
        torch.testing.assert_close(res["gathered"], torch.cat([base, base + 1000]), rtol=0, atol=0)
        assert bool(res["channels_last"])


def test_epoch_shards_are_disjoint_and_cover_the_epoch():
    data = list(range(37))
    for epoch in (0, 1):
        shards = [[i for batch in epoch_loader(data, 4, epoch, seed=5, rank=r, world=3) for i in batch.tolist()]
                  for r in range(3)]
        flat = sum(shards, [])
        assert len(flat) == len(set(flat)) == 3 * (37 // 3 // 4 * 4)  # full per-rank batches only
        assert all(len(s) == len(shards[0]) for s in shards)
    a = [b.tolist() for b in epoch_loader(data, 4, 0, seed=5, rank=0, world=3)]
    b = [b.tolist() for b in epoch_loader(data, 4, 1, seed=5, rank=0, world=3)]
    assert a != b  # a new order each epoch
    rest = [b.tolist() for b in epoch_loader(data, 4, 0, seed=5, skip_batches=1, rank=0, world=3)]
    assert rest == a[1:]  # resuming mid-epoch reads the batches not yet seen


def test_noise_seeds_differ_per_rank_and_step():
    from fastsynth.engine import noise_seed
    seeds = [noise_seed(3, step, rank, 4) for step in range(50) for rank in range(4)]
    assert len(set(seeds)) == len(seeds)
    # A run resumed under other world sizes (2, then 1, then 3 processes) never repeats a seed.
    resumed = ([noise_seed(0, s, r, 2) for s in range(0, 10) for r in range(2)]
               + [noise_seed(0, s, 0, 1) for s in range(10, 30)]
               + [noise_seed(0, s, r, 3) for s in range(30, 40) for r in range(3)])
    assert len(set(resumed)) == len(resumed)
    assert noise_seed(2 ** 32 - 1, 10 ** 9, 2 ** 22 - 1, 2 ** 22) < 2 ** 63  # the Philox key range
    assert noise_seed(3, 7) == noise_seed(3, 7, 0, 1) == 3 * 1_000_003 + 7  # one process: unchanged
    assert noise_seed(3, 7, 1, 2) == noise_seed(3, 7, 1, 2)


def test_config_checks_for_several_ranks():
    assert _cfg("mocov2", "auto").bn_mode() == "shuffle"
    assert _cfg("simsiam", "auto").bn_mode() == "sync"
    with pytest.raises(ValueError, match="shuffle"):
        _cfg("simsiam", "shuffle")


TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1",
        "--probe-epochs", "2", "--probe-fractions", "1.0", "--queue-size", "32", "--bank-size", "16",
        "--decoder-width", "16", "--device", "cpu", "--workers", "0", "--dist-timeout", "3"]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastsynth.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_writes_once_and_resumes(tmp_path):
    root = tiny_folder(tmp_path / "data")
    out = tmp_path / "run"
    # --resume if-any: a fresh run the first time (what an elastic restart policy launches).
    p = _torchrun("--resume", "if-any", "--dataset", "folder", "--data-root", root, "--output-dir", str(out), *TINY)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "starting a fresh run" in p.stdout
    assert p.stdout.count("config:") == 1  # rank 1 prints nothing
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 24 // 8 and len(ckpt["rng_ranks"]) == 2
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["stage"] for r in records].count("ssl") == 1  # one writer
    final = json.load(open(out / "final_metrics.json"))
    assert set(final["metrics"]) == {"trained", "random_init"}
    # Every rank can continue from rank 0's files.
    p = _torchrun("--resume", "if-any", "--output-dir", str(out), "--stage", "ssl", "--dist-timeout", "3")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resuming from" in p.stdout


def test_uneven_global_batch_is_a_clear_error(tmp_path):
    root = tiny_folder(tmp_path / "data")
    args = [a if a != "8" else "9" for a in TINY]
    p = _torchrun("--dataset", "folder", "--data-root", root, "--output-dir", str(tmp_path / "run"), *args,
                  timeout=120)
    assert p.returncode != 0
    assert "error: --batch-size 9 is the global batch and must divide evenly over the 2 processes" in p.stderr


def test_batch_check_judges_the_resumed_config(monkeypatch, tmp_path):
    """The global batch must divide over the processes: checked on the batch the run goes on with.
    A resumed run takes the checkpoint's, whatever the command line's default says."""
    from fastsynth import checkpoint, train
    from fastsynth import dist as fdist
    from fastsynth.config import ConfigError, from_args

    class Started(Exception):
        pass

    monkeypatch.setattr(fdist, "init", lambda device, timeout: torch.device("cpu"))
    monkeypatch.setattr(fdist, "world", lambda: 3)
    monkeypatch.setattr(train, "seed_everything", lambda seed: (_ for _ in ()).throw(Started()))
    for saved, ok in ((96, True), (100, False)):
        def resumed(cfg, saved=saved):
            cfg.batch_size = saved
            return cfg, checkpoint.RunDir(str(tmp_path), "", active=False), None, None
        monkeypatch.setattr(train, "_resume_point", resumed)
        cfg = from_args(["--resume", "auto", "--output-dir", str(tmp_path), "--device", "cpu"])
        assert cfg.batch_size % 3  # the command line's default (64) alone fails the check
        if ok:
            with pytest.raises(Started):
                train.run(cfg)
        else:
            with pytest.raises(ConfigError, match=r"--batch-size 100 \(the resumed run's\) .* 3 processes"):
                train.run(cfg)


def test_a_dead_or_hung_peer_is_one_line_under_gloo(monkeypatch, capsys):
    """gloo raises a plain RuntimeError for a peer that exited or timed out (seen with torch's
    gloo: "Connection closed by peer", "Timed out waiting ... for recv"): one line and exit 1,
    as for DistError; any other RuntimeError still propagates."""
    from fastsynth import dist as fdist
    from fastsynth import train
    monkeypatch.setattr(fdist, "world", lambda: 2)
    for text in ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4242",
                 "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv"):
        monkeypatch.setattr(train, "run", lambda cfg, text=text: (_ for _ in ()).throw(RuntimeError(text)))
        assert train.main(["--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: rank 0 of 2: RuntimeError:") and "--resume auto" in err
    monkeypatch.setattr(train, "run", lambda cfg: (_ for _ in ()).throw(RuntimeError("mat1 and mat2 shapes")))
    with pytest.raises(RuntimeError, match="mat1"):
        train.main(["--device", "cpu"])


def test_epoch_order_does_not_depend_on_the_number_of_processes():
    """Each global batch is the same set of images under 1, 2 or 3 processes (the same global
    batch size), so a run resumed under another world size reads the epoch's remaining images;
    and seed s at epoch e + 1 is not seed s + 1 at epoch e."""
    from fastsynth.data.loaders import rank_order
    n, global_b = 40, 6
    for epoch in (0, 3):
        single = rank_order(n, 7, epoch)
        for world in (2, 3):
            local = global_b // world
            shards = [rank_order(n, 7, epoch, r, world) for r in range(world)]
            for j in range(n // global_b):
                got = sorted(i for s in shards for i in s[j * local:(j + 1) * local])
                assert got == sorted(single[j * global_b:(j + 1) * global_b]), (epoch, world, j)
    for world in (1, 2):
        assert rank_order(n, 7, 1, 0, world) != rank_order(n, 8, 0, 0, world)
