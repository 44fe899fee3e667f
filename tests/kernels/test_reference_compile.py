"""The plain-PyTorch reference layer under torch.compile: every shape is fixed by the batch's size,
not by how many tokens the experts keep, so one graph serves every step (no graph break at the
slot counts or the dispatch, no recompile when the kept count changes) and computes what eager
mode computes, gradients included."""

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import limoe_kernels


def test_the_compiled_reference_layer_runs_steps_with_different_kept_counts_without_recompiling(
        with_grads, moe_layer, layer_inputs):
    reference = limoe_kernels.get_ops("torch")
    steps = []
    for step in range(3):
        torch.manual_seed(step)
        inputs, noise, modality = layer_inputs(torch.device("cpu"))
        inputs[1] = inputs[1] * (1 + 2 * step)  # sharper routing: more tokens pile onto a few experts
        steps.append((inputs, noise, modality))
    kept_counts = [int(reference.moe_layer(x, w, noise, modality, *ffn, 24, 2, None, 5, True).kept.sum())
                   for (x, w, *ffn), noise, modality in steps]
    assert len(set(kept_counts)) == 3, kept_counts  # the premise: every step keeps a different number

    def layer(x, w, noise, modality, *ffn):
        return moe_layer(reference, x, w, ffn, noise, modality, 24, 5)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager")  # as train.compile does: graph breaks allowed
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (x, w, *ffn), noise, modality in steps:
            inputs = [x, w, noise, modality, *ffn]
            upstream = [torch.randn_like(out) for out in layer(*inputs)]  # y and every loss term
            outputs, grads = with_grads(compiled, inputs, upstream)
            outputs_eager, grads_eager = with_grads(layer, inputs, upstream)
            for out, out_eager in zip(outputs, outputs_eager):
                torch.testing.assert_close(out, out_eager)
            for grad, grad_eager in zip(grads, grads_eager):
                torch.testing.assert_close(grad, grad_eager)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
