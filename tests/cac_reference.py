"""A transcription of CAC's DeepLabv3+ model and its unsupervised loss (the test reference).

dvlab-research/Context-Aware-Consistency: ``models/modeling/backbone/resnet.py`` (ResNet with
multi-grid ``layer4``), ``models/modeling/aspp.py``, ``models/modeling/decoder.py``,
``models/modeling/deeplab.py`` and ``models/model.py`` (``CAC``: classifier, projector and the
directional loss of ``forward``, semi mode). Transcribed, not imported: the repository is not a
package and needs CUDA (``.cuda()`` calls are written ``.to(device)`` here; ``np.random.choice``
is ``rng.choice`` on a passed generator, so the reference can draw the same pixels as featviz).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, dilation=dilation, padding=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers, output_stride):
        super().__init__()
        self.inplanes = 64
        blocks = [1, 2, 4]
        if output_stride == 16:
            strides, dilations = [1, 2, 2, 1], [1, 1, 1, 2]
        elif output_stride == 8:
            strides, dilations = [1, 2, 1, 1], [1, 1, 2, 4]
        else:
            raise NotImplementedError
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], strides[0], dilations[0])
        self.layer2 = self._make_layer(128, layers[1], strides[1], dilations[1])
        self.layer3 = self._make_layer(256, layers[2], strides[2], dilations[2])
        self.layer4 = self._make_mg_unit(512, blocks, strides[3], dilations[3])

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, dilation=dilation))
        return nn.Sequential(*layers)

    def _make_mg_unit(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation=blocks[0] * dilation, downsample=downsample)]
        self.inplanes = planes * 4
        for i in range(1, len(blocks)):
            layers.append(Bottleneck(self.inplanes, planes, stride=1, dilation=blocks[i] * dilation))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        low_level_feat = x
        x = self.layer4(self.layer3(self.layer2(x)))
        return x, low_level_feat


class _ASPPModule(nn.Module):
    def __init__(self, inplanes, planes, kernel_size, padding, dilation):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size=kernel_size, stride=1, padding=padding,
                                     dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    def __init__(self, output_stride, inplanes=2048):
        super().__init__()
        dilations = [1, 6, 12, 18] if output_stride == 16 else [1, 12, 24, 36]
        self.aspp1 = _ASPPModule(inplanes, 256, 1, padding=0, dilation=dilations[0])
        self.aspp2 = _ASPPModule(inplanes, 256, 3, padding=dilations[1], dilation=dilations[1])
        self.aspp3 = _ASPPModule(inplanes, 256, 3, padding=dilations[2], dilation=dilations[2])
        self.aspp4 = _ASPPModule(inplanes, 256, 3, padding=dilations[3], dilation=dilations[3])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)),
                                             nn.Conv2d(inplanes, 256, 1, stride=1, bias=False),
                                             nn.BatchNorm2d(256), nn.ReLU())
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(256)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x1, x2, x3, x4 = self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)
        x5 = self.global_avg_pool(x)
        x5 = F.interpolate(x5, size=x4.size()[2:], mode="bilinear", align_corners=True)
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


class Decoder(nn.Module):
    def __init__(self, low_level_inplanes=256):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(nn.Conv2d(304, 256, kernel_size=3, stride=1, padding=1, bias=False),
                                       nn.BatchNorm2d(256), nn.ReLU(), nn.Dropout(0.5),
                                       nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=False),
                                       nn.BatchNorm2d(256), nn.ReLU())

    def forward(self, x, low_level_feat):
        low_level_feat = self.relu(self.bn1(self.conv1(low_level_feat)))
        x = F.interpolate(x, size=low_level_feat.size()[2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((x, low_level_feat), dim=1))


class DeepLab(nn.Module):
    def __init__(self, layers=50, output_stride=16):
        super().__init__()
        self.backbone = ResNet({50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[layers], output_stride)
        self.aspp = ASPP(output_stride)
        self.decoder = Decoder()

    def forward(self, x):
        x, low_level_feat = self.backbone(x)
        return self.decoder(self.aspp(x), low_level_feat)


class CAC(nn.Module):
    """``models/model.py`` ``CAC`` with ``backbone='deeplab_v3+'`` (eval forward and the pieces of
    the semi forward; the loss itself is ``unsup_loss`` below)."""

    def __init__(self, num_classes=21, layers=50, output_stride=16, semi=True, out_dim=256, proj_final_dim=128):
        super().__init__()
        self.encoder = DeepLab(layers, output_stride)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(256, num_classes, kernel_size=1, stride=1))
        if semi:
            self.project = nn.Sequential(nn.Conv2d(out_dim, out_dim, kernel_size=1, stride=1), nn.ReLU(inplace=True),
                                         nn.Conv2d(out_dim, proj_final_dim, kernel_size=1, stride=1))

    def forward(self, x_l):  # not self.training
        enc = self.classifier(self.encoder(x_l))
        return F.interpolate(enc, size=x_l.size()[2:], mode="bilinear", align_corners=True)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, BatchNorm affine and running statistics included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.3 * torch.rand(m.running_var.shape, generator=g))
    return model


# ---------------------------------------------------------------- the loss path of CAC.forward (semi)
def concat_all_gather(tensor):
    with torch.no_grad():  # world size 1 in the tests
        return torch.cat([torch.ones_like(tensor).copy_(tensor)], dim=0)


class UnsupLoss:
    """``CAC.forward`` lines 123-278 (pseudo labels, overlap, negatives, bank, loss1/loss2), on
    features and classifier logits passed in: ``output_ul1/2`` (normalised projections) and
    ``logits1/2``. Keeps CAC's ``feature_bank`` / ``step_count`` between calls."""

    def __init__(self, weight_unsup=0.1, temp=0.1, pos_thresh_value=0.75, selected_num=6400, step_save=1):
        self.weight_unsup, self.temp, self.pos_thresh_value = weight_unsup, temp, pos_thresh_value
        self.selected_num, self.step_save = selected_num, step_save
        self.step_count, self.feature_bank, self.pseudo_label_bank = 0, [], []

    def __call__(self, output_ul1, output_ul2, logits1, logits2, ul1, br1, ul2, br2, flip, rng):
        pseudo_logits_1 = F.softmax(logits1, 1).max(1)[0].detach()
        pseudo_logits_2 = F.softmax(logits2, 1).max(1)[0].detach()
        pseudo_label1 = logits1.max(1)[1].detach()
        pseudo_label2 = logits2.max(1)[1].detach()
        output_feature_list1, output_feature_list2 = [], []
        pseudo_label_list1, pseudo_label_list2 = [], []
        pseudo_logits_list1, pseudo_logits_list2 = [], []
        for idx in range(output_ul1.size(0)):
            output_ul1_idx, output_ul2_idx = output_ul1[idx], output_ul2[idx]
            pseudo_label1_idx, pseudo_label2_idx = pseudo_label1[idx], pseudo_label2[idx]
            pseudo_logits_1_idx, pseudo_logits_2_idx = pseudo_logits_1[idx], pseudo_logits_2[idx]
            if flip[0][idx]:
                output_ul1_idx = torch.flip(output_ul1_idx, dims=(2,))
                pseudo_label1_idx = torch.flip(pseudo_label1_idx, dims=(1,))
                pseudo_logits_1_idx = torch.flip(pseudo_logits_1_idx, dims=(1,))
            if flip[1][idx]:
                output_ul2_idx = torch.flip(output_ul2_idx, dims=(2,))
                pseudo_label2_idx = torch.flip(pseudo_label2_idx, dims=(1,))
                pseudo_logits_2_idx = torch.flip(pseudo_logits_2_idx, dims=(1,))
            s1 = (slice(ul1[0][idx] // 8, br1[0][idx] // 8), slice(ul1[1][idx] // 8, br1[1][idx] // 8))
            s2 = (slice(ul2[0][idx] // 8, br2[0][idx] // 8), slice(ul2[1][idx] // 8, br2[1][idx] // 8))
            output_feature_list1.append(output_ul1_idx[:, s1[0], s1[1]].permute(1, 2, 0).contiguous()
                                        .view(-1, output_ul1.size(1)))
            output_feature_list2.append(output_ul2_idx[:, s2[0], s2[1]].permute(1, 2, 0).contiguous()
                                        .view(-1, output_ul2.size(1)))
            pseudo_label_list1.append(pseudo_label1_idx[s1].contiguous().view(-1))
            pseudo_label_list2.append(pseudo_label2_idx[s2].contiguous().view(-1))
            pseudo_logits_list1.append(pseudo_logits_1_idx[s1].contiguous().view(-1))
            pseudo_logits_list2.append(pseudo_logits_2_idx[s2].contiguous().view(-1))
        output_feat1 = torch.cat(output_feature_list1, 0)
        output_feat2 = torch.cat(output_feature_list2, 0)
        pseudo_label1_overlap = torch.cat(pseudo_label_list1, 0)
        pseudo_label2_overlap = torch.cat(pseudo_label_list2, 0)
        pseudo_logits1_overlap = torch.cat(pseudo_logits_list1, 0)
        pseudo_logits2_overlap = torch.cat(pseudo_logits_list2, 0)

        b, c, h, w = output_ul1.size()
        selected_num = self.selected_num
        output_ul1_flatten = output_ul1.permute(0, 2, 3, 1).contiguous().view(b * h * w, c)
        output_ul2_flatten = output_ul2.permute(0, 2, 3, 1).contiguous().view(b * h * w, c)
        selected_idx1 = rng.choice(b * h * w, selected_num, replace=False)
        selected_idx2 = rng.choice(b * h * w, selected_num, replace=False)
        output_ul_flatten_selected = torch.cat([output_ul1_flatten[selected_idx1],
                                                output_ul2_flatten[selected_idx2]], 0)
        output_ul_all = concat_all_gather(output_ul_flatten_selected)
        pseudo_label_flatten_selected = torch.cat([pseudo_label1.view(-1)[selected_idx1],
                                                   pseudo_label2.view(-1)[selected_idx2]], 0)
        pseudo_label_all = concat_all_gather(pseudo_label_flatten_selected)
        self.feature_bank.append(output_ul_all)
        self.pseudo_label_bank.append(pseudo_label_all)
        if self.step_count > self.step_save:
            self.feature_bank = self.feature_bank[1:]
            self.pseudo_label_bank = self.pseudo_label_bank[1:]
        else:
            self.step_count += 1
        output_ul_all = torch.cat(self.feature_bank, 0)
        pseudo_label_all = torch.cat(self.pseudo_label_bank, 0)

        eps = 1e-8
        pos1 = (output_feat1 * output_feat2.detach()).sum(-1, keepdim=True) / self.temp
        pos2 = (output_feat1.detach() * output_feat2).sum(-1, keepdim=True) / self.temp
        loss1 = self._direction(pos1, output_feat1, output_ul_all, pseudo_label_all, pseudo_label1_overlap,
                                (pseudo_logits2_overlap > self.pos_thresh_value)
                                & (pseudo_logits1_overlap < pseudo_logits2_overlap), eps)
        loss2 = self._direction(pos2, output_feat2, output_ul_all, pseudo_label_all, pseudo_label2_overlap,
                                (pseudo_logits1_overlap > self.pos_thresh_value)
                                & (pseudo_logits2_overlap < pseudo_logits1_overlap), eps)
        return self.weight_unsup * (loss1 + loss2), loss1, loss2, (selected_idx1, selected_idx2)

    def _direction(self, pos, output_feat, output_ul_all, pseudo_label_all, pseudo_label_overlap, pos_mask, eps):
        b = 8000

        def run(pos, output_feat, output_ul_idx, pseudo_label_idx, pseudo_label_overlap, neg_max):
            mask_idx = (pseudo_label_idx.unsqueeze(0) != pseudo_label_overlap.unsqueeze(-1)).float()
            neg_idx = (output_feat @ output_ul_idx.T) / self.temp
            return (torch.exp(neg_idx - neg_max) * mask_idx).sum(-1)

        def run_0(pos, output_feat, output_ul_idx, pseudo_label_idx, pseudo_label_overlap):
            mask_idx = (pseudo_label_idx.unsqueeze(0) != pseudo_label_overlap.unsqueeze(-1)).float()
            neg_idx = (output_feat @ output_ul_idx.T) / self.temp
            neg_idx = torch.cat([pos, neg_idx], 1)
            mask_idx = torch.cat([torch.ones(mask_idx.size(0), 1).float().to(pos.device), mask_idx], 1)
            neg_max = torch.max(neg_idx, 1, keepdim=True)[0]
            return (torch.exp(neg_idx - neg_max) * mask_idx).sum(-1), neg_max

        n = output_ul_all.size(0)
        down = torch.zeros(pos.size(0)).float().to(pos.device)
        for i in range((n - 1) // b + 1):
            pseudo_label_idx = pseudo_label_all[i * b:(i + 1) * b]
            output_ul_idx = output_ul_all[i * b:(i + 1) * b]
            if i == 0:
                neg_idx, neg_max = torch.utils.checkpoint.checkpoint(
                    run_0, pos, output_feat, output_ul_idx, pseudo_label_idx, pseudo_label_overlap,
                    use_reentrant=False)
            else:
                neg_idx = torch.utils.checkpoint.checkpoint(
                    run, pos, output_feat, output_ul_idx, pseudo_label_idx, pseudo_label_overlap, neg_max,
                    use_reentrant=False)
            down += neg_idx
        logits = torch.exp(pos - neg_max).squeeze(-1) / (down + eps)
        pos_mask = pos_mask.float()
        loss = -torch.log(logits + eps)
        return (loss * pos_mask).sum() / (pos_mask.sum() + 1e-12)


def rng_for(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """The generator featviz's trainer draws a step's negatives from."""
    return np.random.default_rng([seed, step, rank])
