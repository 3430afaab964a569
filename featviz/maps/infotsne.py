"""TorchDR's ``InfoTSNE`` with its gradient in closed form, for ``--backend torchdr`` t-SNE.

TorchDR differentiates InfoTSNE's loss with autograd: on CPU the backward pass of its gathers of
(N, k, 2) and (N, m, 2) rows dominates an iteration (20k points, 300 negatives: 0.36 s per
iteration, half of it in ``backward``). ``FastInfoTSNE`` computes the same gradient directly, one
coordinate at a time on blocks of rows: 0.1 s per iteration at 20k on 2 cores (3.6x faster), the
same map. TorchDR has this mode (``_use_closed_form_gradients``, which its UMAP uses) but no closed
form for InfoTSNE, so featviz writes it here (about 80 lines of arithmetic).

The gradient, for point i with input affinities P_ik to its k neighbours and m negatives j drawn
uniformly from the other points, q_ij = 1 / (1 + |y_i - y_j|^2), S_i = sum_j q_ij:

- attraction (``-sum P log q``): 2 P_ik q_ik (y_i - y_k) on y_i, and its opposite on y_k;
- repulsion (``sum_i log S_i / N``): -2 q_ij^2 (y_i - y_j) / (N S_i) on y_i, and its opposite on y_j.

Both ends of each pair receive their share, exactly as autograd gives them;
``tests/test_map_infotsne.py`` checks the equality against TorchDR's own loss terms.

**One deviation from TorchDR's sampler: negatives shared by a group of rows.** TorchDR draws m
negatives for every point, (N, m) indices; featviz draws m for each group of ``negative_group`` (256)
consecutive rows, and every row of the group uses them, with its own index among them left out
(q = 0), so each row's negatives are still uniform over the other points, with replacement. A row's
repulsion is then a broadcast of its group against m points, with no gather per pair. Measured on
2 cores, one iteration's repulsion at 1M points: 5.0 s with per-point draws (plus 2.9 s to draw
300M indices), 0.85 s shared; at 20k, 10-NN class accuracy on ``benchmarks/tsne_bench.py``'s data
0.558 per point, 0.553 shared (openTSNE 0.622). The contrastive-NE code of the InfoNC-t-SNE paper
(Damrich et al., ICLR 2023, ``cne.ContrastiveLoss``) likewise takes each batch's negatives from a
pool the batch shares. Rows are grouped in data order; the draws are new at every iteration.

Every neighbour index is a real row (featviz's ``NeighborSearch`` on CPU, FAISS's exact search on
the GPU), so the gradient needs no check for FAISS's -1. While TorchDR places new points
(``transform``), only the new points move, so the gradient on the frozen map is not computed.
"""

from __future__ import annotations

import torch
import torchdr

BLOCK_PAIRS = (1 << 20, 1 << 26)  # pairs per block of rows: on CPU (4 MB per temporary), on CUDA
NEGATIVE_GROUP = 256  # query rows that share one draw of negatives (FastInfoTSNE's negative_group)


class FastInfoTSNE(torchdr.InfoTSNE):
    """``torchdr.InfoTSNE`` with its gradient in closed form (the same values, without autograd)."""

    def __init__(self, *args, negative_group: int = NEGATIVE_GROUP, **kwargs):
        """As ``torchdr.InfoTSNE``; ``distributed`` is always off (the gradient here is one process's).

        Args:
            *args: ``torchdr.InfoTSNE``'s positional arguments.
            negative_group: consecutive rows that share one draw of negatives (1: a draw per row, as TorchDR).
            **kwargs: ``torchdr.InfoTSNE``'s keyword arguments.
        """
        if kwargs.get("exclude_neighbors_from_negative_sampling"):
            raise ValueError("FastInfoTSNE draws negatives for groups of rows; it cannot exclude each row's neighbours")
        kwargs["distributed"] = False
        super().__init__(*args, **kwargs)
        self.negative_group = int(negative_group)
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
        """Draw ``n_negatives`` points for each group of ``negative_group`` query rows (uniform, with replacement).

        ``neg_indices_`` is (groups, n_negatives); a row's own index among its group's draws is left out
        by the repulsion (``_compute_repulsive_gradients``), so its negatives are uniform over the others.
        """
        groups = -(-len(self.chunk_indices_) // self.negative_group)
        draw = torch.randint(0, self.n_samples_in_, (groups, self.n_negatives), device=self.chunk_indices_.device)
        self.register_buffer("neg_indices_", draw, persistent=False)

    def _pair_gradient(self, keys: torch.Tensor, group: int, weight) -> torch.Tensor:
        """The gradient between query rows and their ``keys``, both ends: ``weight(q, query, keys, rows)`` (y_i - y_k).

        ``keys`` is (groups, m): each group of ``group`` consecutive query rows shares one row of keys (1: every
        row its own, as the neighbours). A group's rows and its keys broadcast against each other, (groups,
        rows, m), so shared keys are gathered once per group. ``weight`` maps the Student-t kernel q of a
        block to its per-pair coefficients. Blocks hold about ``BLOCK_PAIRS`` pairs, so the temporaries stay
        in cache on CPU and bounded in memory at any N.
        """
        y = self.embedding_.detach()
        columns = [y[:, axis].contiguous() for axis in range(y.shape[1])]
        queries = self.chunk_indices_
        on_query = torch.empty(len(queries), len(columns), dtype=y.dtype, device=y.device)
        on_keys = None if self._placing else [torch.zeros_like(c) for c in columns]
        per_block = max(1, BLOCK_PAIRS[y.device.type == "cuda"] // (group * keys.shape[1]))
        whole = len(queries) // group  # whole groups of rows; a last, shorter one follows
        spans = [(g, min(g + per_block, whole), group) for g in range(0, whole, per_block)]
        if whole * group < len(queries):
            spans.append((whole, whole + 1, len(queries) - whole * group))
        for first, end, size in spans:
            rows = slice(first * group, first * group + (end - first) * size)
            query = queries[rows].view(end - first, size, 1)
            block = keys[first:end]
            flat = block.reshape(-1)
            diffs = [c[query] - c.index_select(0, flat).view(end - first, 1, -1) for c in columns]
            coef = weight(sum(d * d for d in diffs).add_(1).reciprocal_(), query, block, rows)
            for axis, d in enumerate(diffs):
                d.mul_(coef)
                on_query[rows, axis] = d.sum(2).reshape(-1)
                if on_keys is not None:
                    on_keys[axis].index_add_(0, flat, (d.sum(1) if size > 1 else d).reshape(-1), alpha=-1)
        if on_keys is None:
            return on_query
        return torch.stack(on_keys, 1).index_add_(0, queries, on_query)

    def _compute_attractive_gradients(self):
        """2 P_ik q_ik (y_i - y_k) on each query row i from its k neighbours, and the opposite on y_k."""
        return self._pair_gradient(self.NN_indices_, 1,
                                   lambda q, query, keys, rows: q.mul_(self.affinity_in_[rows].unsqueeze(1)).mul_(2))

    def _compute_repulsive_gradients(self):
        """-2 q_ij^2 (y_i - y_j) / (N S_i) on each query row i from its group's negatives j, the opposite on y_j.

        A row's own index among its group's draws gets q = 0 (it is not one of its negatives).
        """
        scale = -2.0 / self.n_samples_in_

        def weight(q, query, drawn, rows):
            q.masked_fill_(query == drawn.unsqueeze(1), 0)
            return q.square().div_(q.sum(2, keepdim=True).clamp_min_(1e-30)).mul_(scale)

        return self._pair_gradient(self.neg_indices_, self.negative_group, weight)
