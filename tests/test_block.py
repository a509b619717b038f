"""The plain block: hooks, weight changes in place, lean training, tracers.

The block is the paper's formula with every submodule called as a module; it
keeps no state derived from its weights, so every way users change weights
(optimiser steps, ``load_state_dict``, mmengine's EMA swap and mmdet's
mean-teacher update, both through ``.data``) is seen by the next forward.
Training recomputes the cheap activations (``recompute=True``, PyTorch's
selective checkpointing): gradients must equal the plain path's, with less
memory, forward hooks that replace outputs included.
"""
import pytest
import torch
import torch.nn as nn
from types import SimpleNamespace

from conftest import TINY, assert_matches, count_flops, randomise, relative_error
from conftest import release_pair as pair
from mmconv2former import Conv2Former
from mmconv2former.engine.profiling import peak_memory
from mmconv2former.models import conv2former
from mmconv2former.models.conv2former import Conv2FormerBlock


# ---------------------------------------------------------------------------- hooks
MODES = {'train': dict(recompute=False), 'train-recompute': {}, 'train-modulation': dict(recompute='modulation'),
         'train-with_cp': dict(with_cp=True), 'eval': {}, 'no_grad': {}}


@pytest.mark.parametrize('mode', list(MODES))
def test_forward_hooks_fire_on_every_submodule_in_every_mode(mode):
    """Feature extractors, FLOP counters and quantisation observers hook
    ``attn``, ``mlp``, ``proj``, ``fc2``: they must see every block, once
    per forward pass."""
    model = Conv2Former(TINY, **MODES[mode])
    model.train(mode.startswith('train'))
    seen, calls = {}, {}
    names = ('attn', 'mlp', 'attn.proj', 'mlp.fc2', 'attn.att', 'attn.att.0', 'attn.v', 'mlp.pos')
    def hook(name):
        def record(module, inputs, output):
            seen[name] = output.shape
            calls[name] = calls.get(name, 0) + 1
        return record
    for name, module in model.named_modules():
        if name.endswith(names):
            module.register_forward_hook(hook(name))
    with torch.set_grad_enabled(mode != 'no_grad'):
        model(torch.randn(2, 3, 64, 64))
    blocks = sum(TINY['depths'])
    for suffix in names:
        hit = [n for n in seen if n.endswith('.' + suffix)]
        assert len(hit) == blocks, (suffix, len(hit))
    assert set(calls.values()) == {1}, calls
    assert seen['stages.0.0.attn.proj'] == (2, 16, 16, TINY['channels'][0])  # channels-last


# ---------------------------------------------------------------------------- weights changed in place
def test_weights_written_through_data_are_seen_by_the_next_forward():
    """``p.data.mul_()`` does not bump the version counter: nothing may key on it."""
    ours, ref = pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours(x)
        for p in ours.parameters():
            p.data.mul_(0.9)
        for p in ref.parameters():
            p.data.mul_(0.9)
        assert_matches(ours(x), ref.forward_stages(x))


def test_mmdet_mean_teacher_update_reaches_the_teacher():
    """mmdet's MeanTeacherHook updates the teacher with ``.data`` arithmetic;
    the teacher's next forward equals a fresh model holding its new weights."""
    from mmdet.engine.hooks import MeanTeacherHook
    torch.manual_seed(0)
    teacher, _ = pair()
    student = randomise(Conv2Former(TINY, out_norm=False), seed=3).eval()
    semi = nn.Module()
    semi.teacher, semi.student = teacher, student
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = teacher(x)
        MeanTeacherHook(momentum=0.5).momentum_update(semi, 0.5)
        after = teacher(x)
        fresh = Conv2Former(TINY, out_norm=False).eval()
        fresh.load_state_dict(teacher.state_dict())
        expected = fresh(x)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(after, before))  # the update did something
    for a, b in zip(after, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_mmengine_ema_hook_swap_reaches_the_model():
    """mmengine's EMAHook copies averaged weights in through ``.data`` before
    validation and back after it; each forward equals a fresh model."""
    from mmengine.hooks import EMAHook
    torch.manual_seed(0)
    model, _ = pair()
    runner = SimpleNamespace(model=model, iter=0, epoch=0, max_epochs=1, max_iters=10)
    hook = EMAHook(momentum=0.5, begin_iter=0)
    hook.before_run(runner)
    with torch.no_grad():
        for p in model.parameters():  # "training" moves the weights away from the average
            p.data.add_(torch.randn_like(p) * 0.05)
        hook.after_train_iter(runner, batch_idx=0)
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 64)

    def check(state):
        fresh = Conv2Former(TINY, out_norm=False).eval()
        fresh.load_state_dict(state)
        with torch.no_grad():
            for a, b in zip(model(x), fresh(x)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    with torch.no_grad():
        trained = model(x)
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}
    ema_state = {k: v.clone() for k, v in hook.ema_model.module.state_dict().items()}
    hook.before_val_epoch(runner)  # EMA weights in
    assert not torch.equal(model.stages[0][0].attn.proj.weight, trained_state['stages.0.0.attn.proj.weight'])
    check(ema_state)
    hook.after_val_epoch(runner)  # trained weights back
    check(trained_state)
    with torch.no_grad():
        for a, b in zip(model(x), trained):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_optimiser_step_dtype_and_load_state_dict_are_followed():
    ours, ref = pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours(x)
    params = list(ours.parameters())
    for p in params:
        p.grad = torch.ones_like(p) * 0.01
    torch.optim.SGD(params, lr=1.0).step()
    ref.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():
        assert_matches(ours(x), ref.forward_stages(x))
        outs = ours.double()(x.double())
    assert all(o.dtype == torch.float64 for o in outs)
    assert_matches([o.float() for o in outs], ref.forward_stages(x))


# ---------------------------------------------------------------------------- lean training
def train_pair(drop_path_rate=0.0, **kwargs):
    plain = randomise(Conv2Former(TINY, recompute=False, drop_path_rate=drop_path_rate)).train()
    other = Conv2Former(TINY, drop_path_rate=drop_path_rate, **kwargs).train()
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize('kwargs', [dict(recompute=True), dict(recompute='modulation'), dict(with_cp=True)],
                         ids=['recompute', 'modulation', 'with_cp'])
@pytest.mark.parametrize('drop_path_rate', [0.0, 0.3])
def test_recomputation_gives_the_plain_gradients(kwargs, drop_path_rate):
    """fp32 gradients of every parameter, and of the input, within 1e-5
    (relative) of the path that stores everything, stochastic depth included
    (the recomputed forward must draw the same masks)."""
    plain, other = train_pair(drop_path_rate, **kwargs)
    x = torch.randn(4, 3, 64, 64)
    assert_same_gradients(plain, other, x, tol=1e-5)


def assert_same_gradients(plain, other, x, tol, frozen=()):
    grads = []
    for model in (plain, other):
        torch.manual_seed(7)
        xi = x.clone().requires_grad_()
        outs = model(xi)
        sum((o ** 2).mean() for o in outs).backward()
        grads.append({'input': xi.grad, **{n: p.grad for n, p in model.named_parameters()}})
    for name, grad in grads[0].items():
        if name in frozen:
            assert grad is None and grads[1][name] is None, name
            continue
        assert grad is not None and grad.abs().sum() > 0, name
        assert relative_error(grads[1][name], grad) <= tol, name


def replacing_hooks(model: nn.Module) -> None:
    """Forward hooks that *replace* outputs, as fake quantisation, pruning
    masks and feature editing do, on submodules inside the recomputed blocks."""
    model.stages[0][0].attn.v.register_forward_hook(lambda m, args, out: 2 * out)
    model.stages[0][0].mlp.fc1.register_forward_hook(lambda m, args, out: out.clamp(max=0.1))
    mask = (torch.arange(model.stages[2][1].mlp.pos.out_channels) % 2).float()  # a pruning mask
    model.stages[2][1].mlp.pos.register_forward_hook(lambda m, args, out: out * mask)


@pytest.mark.parametrize('kwargs', [{}, dict(recompute='modulation'), dict(with_cp=True)],
                         ids=['default', 'modulation', 'with_cp'])
def test_output_replacing_hooks_get_the_plain_gradients(kwargs):
    """In the default configuration (``recompute=True``) the backward pass is
    autograd's through the hooked modules, so the hooks' replacements are
    differentiated exactly as with ``recompute=False``."""
    plain, other = train_pair(**kwargs)
    with torch.no_grad():  # layer scales large enough that the hooked blocks matter
        for model in (plain, other):
            for name, p in model.named_parameters():
                if 'layer_scale' in name:
                    p.fill_(0.5)
    for model in (plain, other):
        replacing_hooks(model)
    x = torch.randn(2, 3, 64, 64)
    assert_same_gradients(plain, other, x, tol=1e-5)
    unhooked = train_pair()[0]
    unhooked.load_state_dict(plain.state_dict())
    with torch.no_grad():  # the hooks really change the model
        assert (unhooked(x)[0] - plain(x)[0]).abs().max() > 1e-3


def gradient_penalty_step(model: nn.Module):
    """A gradient penalty (R1-style): differentiates the input gradient."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad, = torch.autograd.grad(sum(o.square().mean() for o in model(x)), x, create_graph=True)
    penalty = grad.square().sum()
    penalty.backward()
    return penalty.detach(), model.stages[1][0].mlp.fc1.weight.grad


def test_double_backward_with_cp_and_its_limit_under_recompute():
    """Full checkpointing (``with_cp``) records a differentiable graph for
    double backward, as storing everything does; PyTorch's selective
    checkpointing (``recompute=True``) refuses a second backward through its
    region, loudly, which the docstring of ``recompute`` says."""
    arch = dict(TINY, depths=[1, 1, 1, 1])
    plain = randomise(Conv2Former(arch, recompute=False)).train()
    results = {}
    for name, kwargs in [('plain', dict(recompute=False)), ('with_cp', dict(with_cp=True))]:
        model = Conv2Former(arch, **kwargs).train()
        model.load_state_dict(plain.state_dict())
        results[name] = gradient_penalty_step(model)
    torch.testing.assert_close(results['with_cp'][0], results['plain'][0], rtol=1e-5, atol=0)
    assert results['plain'][1].abs().sum() > 0
    assert relative_error(results['with_cp'][1], results['plain'][1]) <= 1e-5
    with pytest.raises(RuntimeError, match='selective activation checkpoint'):
        gradient_penalty_step(Conv2Former(arch).train())


def test_recomputation_stores_less_and_keeps_with_cp_least():
    """Peak activation memory of a training step: recomputation below 60% of
    storing everything, ``recompute='modulation'`` lower (its blocks store
    28 of the 40 bytes per pixel and channel that ``recompute=True``'s do in
    fp32; the stem, the patch mergings and the backward pass's temporaries
    are the same); full checkpointing (``with_cp``) lower still. Two blocks
    per stage: with one, the peak is that block's own backward pass, which
    full checkpointing does not shrink."""
    x = torch.randn(4, 3, 96, 96)
    arch = dict(TINY, depths=[2, 2, 2, 2])
    peaks = {}
    for name, kwargs in [('plain', dict(recompute=False)), ('recompute', {}),
                         ('modulation', dict(recompute='modulation')), ('with_cp', dict(with_cp=True))]:
        model = Conv2Former(arch, **kwargs).train()

        def step():
            sum(o.mean() for o in model(x)).backward()
            model.zero_grad(set_to_none=True)
        step()
        peaks[name] = peak_memory(step, 'cpu')
    assert peaks['recompute'] < 0.6 * peaks['plain'], peaks
    assert peaks['modulation'] < 0.97 * peaks['recompute'], peaks  # 0.93 on an AVX2 EPYC
    assert peaks['with_cp'] < peaks['modulation'], peaks


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16'])
def test_each_recompute_mode_stores_the_outputs_it_names(monkeypatch, autocast):
    """What the policy keeps of each block's forward pass, as the products
    reach it (``addmm`` with the weight, transposed, last; in fp32 and under
    autocast): ``recompute=True`` all five products, C->C three times, C->4C
    and 4C->C; ``'modulation'`` only the MLP's two; both the large-kernel
    depthwise convolution's output, and nothing else."""
    cp = torch.utils.checkpoint
    keep, kept = conv2former._keep_outputs, []

    def spy(modulation_products, ctx, op, *args, **kwargs):
        policy = keep(modulation_products, ctx, op, *args, **kwargs)
        if policy == cp.CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            product = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            kept.append((str(op), tuple(args[-1].shape if product else args[1].shape)))
        return policy

    monkeypatch.setattr(conv2former, '_keep_outputs', spy)
    arch = dict(TINY, depths=[1, 1, 1, 1])
    for mode in (True, 'modulation'):
        kept.clear()
        model = Conv2Former(arch, recompute=mode).train()
        with torch.autocast('cpu', torch.bfloat16, enabled=autocast):
            sum(o.mean() for o in model(torch.randn(1, 3, 64, 64))).backward()
        expected = []
        for c in arch['channels']:
            expected += [('aten.addmm.default', (c, 4 * c)), ('aten.addmm.default', (4 * c, c)),
                         ('aten.convolution.default', (c, 1, 5, 5))]
            expected += [('aten.addmm.default', (c, c))] * 3 if mode is True else []
        assert sorted(kept) == sorted(expected), mode


def count_checkpoints(monkeypatch) -> list:
    """The ``context_fn`` of every call of torch's checkpoint."""
    calls = []
    orig = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint',
                        lambda *a, **k: calls.append(k.get('context_fn')) or orig(*a, **k))
    return calls


def test_recompute_is_for_training_only_and_the_same_under_autocast(monkeypatch):
    """Eval mode, or autograd off, runs the blocks plainly (nothing to store);
    training checkpoints every block selectively, with and without autocast;
    ``recompute=False`` stores everything."""
    calls = count_checkpoints(monkeypatch)
    blocks = sum(TINY['depths'])
    model = Conv2Former(TINY).eval()
    model(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 64, 64))
    assert calls == []
    model.train()(torch.randn(2, 3, 64, 64))
    assert len(calls) == blocks and all(c is not None for c in calls)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randn(2, 3, 64, 64))
    assert len(calls) == 2 * blocks and all(c is not None for c in calls)
    Conv2Former(TINY, recompute=False).train()(torch.randn(2, 3, 64, 64))
    assert len(calls) == 2 * blocks


@pytest.mark.parametrize('value, text', [('selective', 'recompute=True now does'),
                                         ('explicit', "True, False or 'modulation'"),
                                         (1, "True, False or 'modulation'"), ('Modulation', 'got .Modulation.')])
def test_recompute_rejects_other_values(value, text):
    with pytest.raises(ValueError, match=text):
        Conv2Former(TINY, recompute=value)


def test_without_selective_checkpointing_recompute_falls_back_to_plain(monkeypatch):
    """On a torch without ``create_selective_checkpoint_contexts`` (< 2.4)
    ``recompute=True`` runs the blocks plainly (no checkpointing at all) and
    trains as before."""
    monkeypatch.delattr(torch.utils.checkpoint, 'create_selective_checkpoint_contexts')
    monkeypatch.setattr(conv2former, '_noted_missing_selective', False)
    calls = count_checkpoints(monkeypatch)
    plain, other = train_pair()
    x = torch.randn(2, 3, 64, 64)
    outs = [plain(x), other(x)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert calls == []
    assert conv2former._noted_missing_selective  # the user was told
    sum(o.mean() for o in outs[1]).backward()
    assert all(p.grad is not None for p in other.parameters())


# ---------------------------------------------------------------------------- tracers and compilers
def random_block(drop_path: float = 0.0) -> Conv2FormerBlock:
    torch.manual_seed(0)
    block = Conv2FormerBlock(16, 5, drop_path=drop_path)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if 'layer_scale' in name or name.endswith('norm.weight'):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return block


def test_block_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph=True fails on any graph break."""
    torch.compiler.reset()
    block = random_block(drop_path=0.1).eval()
    x = torch.randn(2, 8, 8, 16)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_backbone_compiles_for_training_with_recompute_and_matches_eager():
    torch.compiler.reset()
    arch = dict(TINY, depths=[1, 1, 1, 1])  # compile time grows with the blocks
    eager = randomise(Conv2Former(arch, recompute=False)).train()
    compiled_model = Conv2Former(arch).train()
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(compiled_model)
    out, expected = compiled(x), eager(x)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sum(o.square().mean() for o in out).backward()
    sum(o.square().mean() for o in expected).backward()
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def assert_traces_with_plain_ops(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """torch.jit.trace (as get_flops and ONNX export use it) records public ops."""
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert_matches(traced(x), ref.forward_stages(x))
    assert 'mkldnn' not in str(traced.graph)


def test_tracing_and_flop_counting_see_the_plain_model():
    ours, ref = pair()
    x = torch.randn(1, 3, 64, 64)
    training = Conv2Former(TINY, out_norm=False).train()  # the checkpointed blocks
    training.load_state_dict(ours.state_dict())
    assert count_flops(training, x) == count_flops(ours, x) > 0
    assert_traces_with_plain_ops(ours, ref, x)


def test_block_keeps_an_fp32_residual_under_autocast():
    block = random_block().eval()
    x = torch.randn(2, 8, 8, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = block(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, block(x), atol=0.05, rtol=0.05)


def test_drop_path_is_random_in_training():
    torch.manual_seed(0)
    block = Conv2FormerBlock(16, 5, drop_path=0.5, layer_scale_init_value=1.0).train()
    x = torch.randn(8, 4, 4, 16)
    kept = [(block(x) - x).flatten(1).abs().sum(1) for _ in range(2)]
    assert not torch.equal(kept[0], kept[1])
