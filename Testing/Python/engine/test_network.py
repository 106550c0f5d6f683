"""The network exposes features at output resolution and its head grows without touching old classes."""

import math

import pytest
import torch

from cimis.errors import CimisError
from cimis.model.head import GrowableHead
from cimis.model.network import NetworkConfig, SegmentationNet, nnunet_kernels_and_strides


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SegmentationNet(NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2]), 4).eval()


def test_features_are_at_output_resolution_and_feed_the_head(net):
    x = torch.randn(2, 1, 16, 16, 8)
    logits, features = net.forward_with_features(x)
    assert logits.shape == (2, 4, 16, 16, 8)
    assert features.shape == (2, net.config.feature_dim, 16, 16, 8)
    torch.testing.assert_close(net.head(features), logits)
    torch.testing.assert_close(net(x), logits)


def test_random_growth_keeps_every_old_logit(net):
    x = torch.randn(1, 1, 16, 16, 8)
    before = net(x)
    net.head.grow(3, init="random")
    after = net(x)
    assert after.shape[1] == 7
    torch.testing.assert_close(after[:, :4], before)


def test_balanced_growth_splits_background_and_keeps_old_class_probabilities(net):
    x = torch.randn(1, 1, 16, 16, 8)
    before = torch.softmax(net(x), 1)
    old_weights = net.head.conv.weight.detach().clone()
    net.head.grow(2, init="balanced")
    after = torch.softmax(net(x), 1)
    # Old foreground classes: logits and weights untouched, probabilities unchanged.
    torch.testing.assert_close(net.head.conv.weight[:4], old_weights)
    torch.testing.assert_close(after[:, 1:4], before[:, 1:4])
    # Background probability is now shared equally by background and the 2 new classes.
    torch.testing.assert_close(after[:, [0, 4, 5]].sum(1), before[:, 0])
    torch.testing.assert_close(after[:, 4], after[:, 0])
    assert net.head.conv.bias[4].item() == pytest.approx(net.head.conv.bias[0].item())


def test_growth_bias_value():
    head = GrowableHead(3, 2)
    with torch.no_grad():
        head.conv.bias[:] = torch.tensor([0.5, -1.0])
    head.grow(3)
    assert head.conv.bias[0].item() == pytest.approx(0.5 - math.log(4))
    assert head.conv.bias[1].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        head.grow(0)


def test_nnunet_plan_keeps_thick_slices_unpooled():
    kernels, strides = nnunet_kernels_and_strides((128, 128, 32), (0.8, 0.8, 4.0))
    assert strides[0] == [1, 1, 1]
    assert kernels[0] == [3, 3, 1]  # slice axis too coarse for a 3-wide kernel at full resolution
    assert strides[1] == [2, 2, 1]


def test_presets_and_patch_divisibility():
    small = NetworkConfig.preset("small", (64, 64, 48), (4, 4, 4))
    assert small.size_divisor == [8, 8, 8]
    big = NetworkConfig.preset("dynunet", (96, 96, 96), (1.5, 1.5, 2.0))
    assert big.filters[0] == 32 and len(big.filters) == len(big.strides)
    with pytest.raises(CimisError):
        NetworkConfig.preset("resnet", (64, 64, 64), (1, 1, 1))
