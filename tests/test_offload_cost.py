"""The offload terms of the planner's cost model (bigtrain.planner.cost.overhead), against
figures worked out by hand.

What cost.py models for an offloaded span i (after keep_last_on_device), with f_i its forward
time, f_{i+1} the next span's and c = (its host bytes) / hardware.host_bandwidth:
    device->host exposed  max(0, c - f_i - f_{i+1})   (two spans of copies in flight)
    host->device exposed  max(0, c - b_{i+1})         (prefetched during the next span's replay
                                                       and backward: b = 3 f checkpointed, else 2 f)
plus, for a checkpointed span, its recompute f_i; the total is divided by the modelled step
3 (n_layers * block_fwd + 2 S vocab) / (peak_tflops * mfu).

The job below is chosen so that every figure is round:
    S = b * s = 2 * 32 = 64 tokens, dim 64, tp 1
    block_fwd = 2 S per_block + 4 S s dim = 2*64*4096 + 4*64*32*64 = 524288 + 524288 = 2^20 flops
    peak_tflops * mfu = 1.048576e-3 TFLOP/s = 2^20 / 1 ms: one block's forward takes f = 1 ms
    step = 3 (4 * 2^20 + 2*64*8192) / (2^20 / ms) = 3 * (4 + 1) ms = 15 ms
    a full span keeps only its fp32 input: 4 * S * dim = 16384 bytes, whatever its length;
    at host_bandwidth B GB/s it takes c = 16384 / (B * 1e9) s each way.
"""

import pytest

from bigtrain.config import load_config
from bigtrain.job import resolve
from bigtrain.planner.cost import overhead
from bigtrain.planner.memory import Params
from bigtrain.recompute.policy import Span

STEP_MS = 15.0
N = Params(total=4 * 4096 + 8192, decay=4 * 4096 + 8192, per_block=4096, vocab=8192, output=8192)


def job(host_bandwidth: float, min_size: str = "0"):
    cfg = load_config(None, ["model.n_layers=4", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.ffn_hidden=128", "model.vocab_size=8192", "train.seq_len=32",
                             "train.micro_batch_size=2", "train.global_batch_size=2", "train.device=cpu",
                             "hardware.peak_tflops=0.001048576", "hardware.mfu=1.0",
                             f"hardware.host_bandwidth={host_bandwidth}", f"recompute.offload_min_size={min_size}"])
    return resolve(cfg, 1, "cpu")


def bandwidth_for(copy_ms: float) -> float:
    """hardware.host_bandwidth (GB/s) at which a span's 16384 input bytes take copy_ms each way."""
    return 16384 / (copy_ms * 1e-3) / 1e9


def full(start, stop, offload=True):
    return Span(start, stop, checkpointed=True, offload=offload)


def one_block_spans(offload=True):
    return [full(i, i + 1, offload) for i in range(4)]


def ms(extra_ms: float) -> float:
    """overhead()'s value for extra_ms of extra step time."""
    return pytest.approx(extra_ms / STEP_MS, rel=1e-9)


def test_step_and_recompute_figures_of_the_job():
    # No offload: only the recompute of each one-block full span, 1 ms each.
    assert overhead(job(bandwidth_for(5)), N, one_block_spans(offload=False)) == ms(4)


def test_copy_longer_than_compute_exposes_the_difference():
    # c = 5 ms. Spans 0-2 offload (span 3, the last, stays on the device):
    #   device->host 5 - 1 - 1 = 3 ms, host->device 5 - 3*1 = 2 ms (the next span's replay and
    #   backward), each; 3 * (3 + 2) = 15 ms exposed, plus 4 * 1 ms recompute.
    assert overhead(job(bandwidth_for(5)), N, one_block_spans()) == ms(15 + 4)


def test_compute_hiding_the_copy_exposes_nothing():
    # c = 0.5 ms < f + f_next = 2 ms and < 3 f_next = 3 ms: no exposure, recompute only.
    assert overhead(job(bandwidth_for(0.5)), N, one_block_spans()) == ms(4)
    # At the device->host edge: c = 2 ms is exactly hidden (and host->device, 2 < 3).
    assert overhead(job(bandwidth_for(2)), N, one_block_spans()) == ms(4)


def test_last_span_kept_on_the_device_costs_nothing():
    slow = job(bandwidth_for(50))  # a copy would expose ~tens of ms
    # One span of all 4 blocks, offload asked for: it is the last span, kept on the device.
    assert overhead(slow, N, [full(0, 4)]) == ms(4)  # its recompute, 4 ms
    # Only the last of four spans asks for offload: nothing is copied.
    spans = [*one_block_spans(offload=False)[:3], full(3, 4)]
    assert overhead(slow, N, spans) == ms(4)


def test_two_spans_in_flight_hide_behind_the_next_span_too():
    # Spans [0], [1, 2], [3]; c = 5 ms; f = 1, 2, 1 ms.
    #   span 0: device->host 5 - 1 - 2 = 2 ms (its own and span 1's forward), host->device
    #           5 - 3*2 < 0: hidden behind span 1's replay and backward (6 ms)
    #   span 1: device->host 5 - 2 - 1 = 2 ms, host->device 5 - 3*1 = 2 ms (span 2's, 3 ms)
    #   span 2 (last): on the device, 0
    # recompute 1 + 2 + 1 = 4 ms; total 4 + 2 + 0 + 2 + 2 = 10 ms.
    # (With one span in flight, device->host would expose 5 - 1 = 4 and 5 - 2 = 3 ms; hiding the
    # reload behind the span's own backward instead of the next one's would give 3 and 1 ms.)
    spans = [full(0, 1), full(1, 3), full(3, 4)]
    assert overhead(job(bandwidth_for(5)), N, spans) == ms(10)


def test_reload_before_an_unrecomputed_span_hides_behind_its_backward_only():
    # Span 1 (one block) keeps its tensors (no replay: backward 2 f = 2 ms); c = 5 ms.
    #   span 0: device->host 5 - 1 - 1 = 3 ms, host->device 5 - 2*1 = 3 ms; recompute 1 ms
    #   span 1: nothing copied, nothing recomputed
    #   span 2 (blocks 2-3, last, not offloaded): recompute 2 ms
    spans = [full(0, 1), Span(1, 2, checkpointed=False), full(2, 4, offload=False)]
    assert overhead(job(bandwidth_for(5)), N, spans) == ms(1 + 3 + 3 + 2)


@pytest.mark.parametrize("host_bandwidth, extra_ms", [
    (0.0032768, 4 + 3 * (3.0 + 2.0)),  # c = 16384 / 3.2768e6 = 5 ms: 3 ms out, 2 ms back per span
    (0.0065536, 4 + 3 * 0.5),  # twice the bandwidth, c = 2.5 ms: 0.5 ms out, back hidden (< 3)
    (0.0131072, 4),  # four times, c = 1.25 ms: hidden
    (0.0016384, 4 + 3 * (8.0 + 7.0)),  # half, c = 10 ms: 8 ms out, 7 ms back
])
def test_exposed_copy_time_scales_with_host_bandwidth(host_bandwidth, extra_ms):
    assert overhead(job(host_bandwidth), N, one_block_spans()) == ms(extra_ms)


def test_tensors_under_offload_min_size_are_not_copied():
    # 16384-byte inputs under a 16 KiB + 1 B threshold stay on the device: recompute only.
    assert overhead(job(bandwidth_for(5), min_size="16385B"), N, one_block_spans()) == ms(4)
    assert overhead(job(bandwidth_for(5), min_size="16384B"), N, one_block_spans()) == ms(15 + 4)
