"""TorchDR's ``InfoTSNE`` with its gradient in closed form, for ``--backend torchdr`` t-SNE.

TorchDR differentiates InfoTSNE's loss with autograd: on CPU the backward pass of its gathers of
(N, k, 2) and (N, m, 2) rows dominates an iteration (20k points, 300 negatives: 0.36 s per
iteration, half of it in ``backward``). ``FastInfoTSNE`` computes the same gradient directly, one
coordinate at a time on blocks of rows of the (N, k) and (N, m) arrays, and draws the negatives
with one ``randint``: 0.1 s per iteration at 20k on 2 cores (3.6x faster), the same map. TorchDR has this mode
(``_use_closed_form_gradients``, which its UMAP uses) but no closed form for InfoTSNE, so featviz
writes it here (about 50 lines of arithmetic).

The gradient, for point i with input affinities P_ik to its k neighbours and m negatives j drawn
uniformly from the other points, q_ij = 1 / (1 + |y_i - y_j|^2), S_i = sum_j q_ij:

- attraction (``-sum P log q``): 2 P_ik q_ik (y_i - y_k) on y_i, and its opposite on y_k;
- repulsion (``sum_i log S_i / N``): -2 q_ij^2 (y_i - y_j) / (N S_i) on y_i, and its opposite on y_j.

Both ends of each pair receive their share, exactly as autograd gives them;
``tests/test_map_infotsne.py`` checks the equality against TorchDR's own loss. The negatives are
those of TorchDR's sampler when only the point itself is excluded (uniform over the other N - 1
points, with replacement), drawn by ``randint`` and a shift past i instead of a search in sorted
exclusions. Every neighbour index is a real row (featviz's ``NeighborSearch`` on CPU, FAISS's exact
search on the GPU), so the gradient needs no check for FAISS's -1. While TorchDR places new points
(``transform``), only the new points move, so the gradient on the frozen map is not computed.
"""

from __future__ import annotations

import torch
import torchdr

BLOCK_PAIRS = (1 << 20, 1 << 26)  # pairs per block of rows: on CPU (4 MB per temporary), on CUDA


class FastInfoTSNE(torchdr.InfoTSNE):
    """``torchdr.InfoTSNE`` with its gradient in closed form (the same values, without autograd)."""

    def __init__(self, *args, **kwargs):
        """As ``torchdr.InfoTSNE``; ``distributed`` is always off (the gradient here is one process's)."""
        kwargs["distributed"] = False
        super().__init__(*args, **kwargs)
        self._use_closed_form_gradients = True
        self._placing = False

    def _enter_transform(self, *args, **kwargs):
        saved = super()._enter_transform(*args, **kwargs)
        self._placing = True
        return saved

    def _exit_transform(self, saved):
        self._placing = False
        super()._exit_transform(saved)

    def on_training_step_start(self):
        """Draw ``n_negatives`` points per point, uniformly among the other points (with replacement)."""
        if self.exclude_neighbors_from_negative_sampling:
            return super().on_training_step_start()
        rows = self.chunk_indices_.unsqueeze(1).to(torch.int32)
        draw = torch.randint(0, self.n_samples_in_ - 1, (len(rows), self.n_negatives), device=rows.device,
                             dtype=torch.int32)  # int32: half the bytes to draw and to index with
        self.register_buffer("neg_indices_", draw + (draw >= rows), persistent=False)

    def _pair_gradient(self, keys: torch.Tensor, weight) -> torch.Tensor:
        """The gradient from each query row to its ``keys``: ``weight(q, rows)`` times (y_i - y_key), both ends.

        ``weight`` maps the Student-t kernel q of a block of query ``rows`` (a slice) to their per-pair
        coefficients. Rows go in blocks of about ``BLOCK_PAIRS`` pairs, so the temporaries stay in cache
        on CPU and bounded in memory at any N.
        """
        y = self.embedding_.detach()
        columns = [y[:, axis].contiguous() for axis in range(y.shape[1])]
        queries = self.chunk_indices_
        per_block = max(1, BLOCK_PAIRS[y.device.type == "cuda"] // keys.shape[1])
        on_query = torch.empty(len(queries), len(columns), dtype=y.dtype, device=y.device)
        on_keys = None if self._placing else [torch.zeros_like(c) for c in columns]
        for start in range(0, len(queries), per_block):
            rows = slice(start, start + per_block)
            block = keys[rows]
            flat = block.reshape(-1)
            diffs = [c[queries[rows]].unsqueeze(1) - c.index_select(0, flat).view(block.shape) for c in columns]
            coef = weight(sum(d * d for d in diffs).add_(1).reciprocal_(), rows)
            for axis, d in enumerate(diffs):
                d.mul_(coef)
                on_query[rows, axis] = d.sum(1)
                if on_keys is not None:
                    on_keys[axis].index_add_(0, flat, d.reshape(-1), alpha=-1)
        if on_keys is None:
            return on_query
        return torch.stack(on_keys, 1).index_add_(0, queries, on_query)

    def _compute_attractive_gradients(self):
        return self._pair_gradient(self.NN_indices_, lambda q, rows: q.mul_(self.affinity_in_[rows]).mul_(2))

    def _compute_repulsive_gradients(self):
        scale = -2.0 / self.n_samples_in_
        return self._pair_gradient(self.neg_indices_,
                                   lambda q, rows: q.square().div_(q.sum(1, keepdim=True)).mul_(scale))
