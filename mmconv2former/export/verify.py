"""The exported file in onnxruntime against the PyTorch model: differences
relative to the outputs' scale, label agreement, and the time of both."""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .specs import ExportSpec


def max_relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the
    output's scale (an elementwise ratio explodes where outputs cross zero)."""
    expected = expected.astype(np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    diff = float(np.abs(actual.astype(np.float64) - expected).max()) if expected.size else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class Comparison:
    """The ONNX file against PyTorch on one input."""
    name: str                   # which input
    shape: Tuple[int, ...]
    max_rel_diff: float         # over all float outputs
    worst_output: str
    label_agreement: Optional[float] = None  # % of equal labels (segmentors), top-1 (classifiers)
    labels: int = 0             # how many labels were compared
    label_mismatches: int = 0


def _run_both(session, spec: ExportSpec, batch: torch.Tensor, images: List[torch.Tensor]
              ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    onnx_out = session.run(spec.output_names, {'images': batch.numpy()})
    with torch.no_grad():
        torch_out = [t.detach().cpu().numpy() for t in spec.reference(images)]
    if len(onnx_out) != len(torch_out):
        raise RuntimeError(f'{len(onnx_out)} ONNX outputs but {len(torch_out)} PyTorch outputs')
    for out_name, a, b in zip(spec.output_names, onnx_out, torch_out):
        if a.shape != b.shape:
            raise RuntimeError(f'output {out_name}: ONNX shape {a.shape}, PyTorch {b.shape}')
    return onnx_out, torch_out


def compare(session, spec: ExportSpec, images: List[torch.Tensor], name: str) -> Comparison:
    """Run the ONNX file and the PyTorch model (through its data preprocessor
    and the library's own inference route) on ``images`` (same size)."""
    batch = torch.stack([im.float() for im in images])
    onnx_out, torch_out = _run_both(session, spec, batch, images)
    worst, worst_name, labels, mismatches = -1.0, '', 0, 0
    for out_name, a, b in zip(spec.output_names, onnx_out, torch_out):
        if np.issubdtype(b.dtype, np.integer):
            labels, mismatches = int(b.size), int((a != b).sum())
            continue
        diff = max_relative_difference(a, b)
        if diff > worst:
            worst, worst_name = diff, out_name
    if spec.kind == 'classifier':
        top1_onnx, top1_torch = onnx_out[0].argmax(-1), torch_out[0].argmax(-1)
        labels, mismatches = int(top1_torch.size), int((top1_onnx != top1_torch).sum())
    agreement = 100.0 * (labels - mismatches) / labels if labels else None
    return Comparison(name, tuple(batch.shape), worst, worst_name, agreement, labels, mismatches)


def benchmark(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _shape(shape: Tuple[int, ...]) -> str:
    return 'x'.join(map(str, shape))


@dataclass
class VerifyReport:
    """What :func:`verify` found: one :class:`Comparison` per input, the
    times, and the limits the comparisons are held to."""
    comparisons: List[Comparison]
    onnx_ms: float
    torch_ms: float         # the library's inference route (data preprocessor, post-processing)
    graph_ms: float         # the exported module itself, eager PyTorch
    timing_shape: Tuple[int, ...]
    tolerance: float
    min_agreement: float

    @property
    def max_rel_diff(self) -> float:
        return max(c.max_rel_diff for c in self.comparisons)

    @property
    def failures(self) -> List[str]:
        bad = [f'{c.name}: max relative difference {c.max_rel_diff:.2e} ({c.worst_output}) '
               f'> {self.tolerance:.0e}' for c in self.comparisons if c.max_rel_diff > self.tolerance]
        bad += [f'{c.name}: label agreement {c.label_agreement:.3f}% < {self.min_agreement}%'
                for c in self.comparisons
                if c.label_agreement is not None and c.label_agreement < self.min_agreement]
        return bad

    def lines(self) -> List[str]:
        out = []
        for c in self.comparisons:
            line = f'{c.name:<40} {_shape(c.shape):<16} max rel diff {c.max_rel_diff:.2e} ' \
                   f'({c.worst_output})'
            if c.label_agreement is not None:
                line += (f', labels equal {c.label_agreement:.3f}% '
                         f'({c.label_mismatches} of {c.labels} differ)')
            out.append(line)
        out.append(f'time per batch {_shape(self.timing_shape)} (median): onnxruntime '
                   f'{self.onnx_ms:.1f} ms; PyTorch {self.torch_ms:.1f} ms through the library\'s '
                   f'inference route, {self.graph_ms:.1f} ms the exported module in eager mode '
                   f'({torch.get_num_threads()} torch threads)')
        out.append(f'worst max relative difference {self.max_rel_diff:.2e} '
                   f'(limit {self.tolerance:.0e}): {"FAIL" if self.failures else "ok"}')
        return out


def _resized(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    image = F.interpolate(image[None].float(), size=(h, w), mode='bilinear', align_corners=False)
    return image[0].round().clamp(0, 255).to(torch.uint8)


def verify(path: str, spec: ExportSpec, real_images: List[Tuple[str, torch.Tensor]],
           shape: Tuple[int, int], dynamic: bool, tolerance: float = 1e-4,
           min_agreement: float = 99.9, repeat: int = 5, seed: int = 0) -> VerifyReport:
    """Compare ``path`` in onnxruntime with the PyTorch model.

    Inputs: each real image (resized to ``shape`` when the graph is static),
    a random image at ``shape`` and, when ``dynamic``, random batches at
    other sizes: two images whose sides are multiples of 32 and one image
    whose sides are not. Then both are timed on a random image at ``shape``
    (median of ``repeat`` runs).
    """
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    h, w = shape
    comparisons = []
    for name, image in real_images:
        if not dynamic and tuple(image.shape[1:]) != (h, w):
            image, name = _resized(image, h, w), f'{name} (resized to {h}x{w})'
        comparisons.append(compare(session, spec, [image], name))
    gen = torch.Generator().manual_seed(seed)

    def random_images(n, hh, ww):
        return [torch.randint(0, 256, (3, hh, ww), generator=gen, dtype=torch.uint8)
                for _ in range(n)]

    comparisons.append(compare(session, spec, random_images(1, h, w), 'random'))
    if dynamic:
        h32, w32 = (h + 31) // 32 * 32 + 32, (w + 31) // 32 * 32 + 64
        comparisons.append(compare(session, spec, random_images(2, h32, w32),
                                   'random, sides multiples of 32'))
        comparisons.append(compare(session, spec, random_images(1, h32 + 13, w32 - 25),
                                   'random, sides not multiples of 32'))
    images = random_images(1, h, w)
    batch = torch.stack([im.float() for im in images]).numpy()
    onnx_ms = benchmark(lambda: session.run(None, {'images': batch}), repeat)
    with torch.no_grad():
        torch_ms = benchmark(lambda: spec.reference(images), repeat)
        graph_ms = benchmark(lambda: spec.module(torch.from_numpy(batch)), repeat)
    return VerifyReport(comparisons, onnx_ms, torch_ms, graph_ms, (1, 3, h, w), tolerance,
                        min_agreement)
