"""Position encodings against the PyTorch reference (pure functions: tight tolerances)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sam2.modeling.position_encoding import PositionEmbeddingRandom as TorchRandom  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402
from sam2.modeling.sam2_utils import get_1d_sine_pe as torch_1d  # noqa: E402

from medsam2_jax.interop.torch_models import state_dict_numpy, to_numpy  # noqa: E402
from medsam2_jax.interop.weights import load_state_dict  # noqa: E402
from medsam2_jax.model.position import PositionEmbeddingRandom, get_1d_sine_pe, sine_position_encoding  # noqa: E402
from flax import nnx  # noqa: E402


@pytest.mark.parametrize("hw,c", [((16, 16), 256), ((32, 32), 64), ((8, 12), 256)])
def test_sine_matches_torch(hw, c):
    ref = PositionEmbeddingSine(num_pos_feats=c)(torch.zeros(1, c, *hw))
    ours = sine_position_encoding(hw[0], hw[1], c)
    # float32 sin/cos of arguments up to 2*pi: a few ulp.
    np.testing.assert_allclose(ours, to_numpy(ref)[0].transpose(1, 2, 0), atol=2e-6, rtol=0)


def test_1d_sine_matches_torch():
    pos = torch.tensor([0.0, 1.0, -3.0, 0.25, 7.0]) / 15
    np.testing.assert_allclose(np.asarray(get_1d_sine_pe(jnp.asarray(pos.numpy()), 256)),
                               to_numpy(torch_1d(pos, 256)), atol=1e-6, rtol=0)


def test_random_pe_matches_torch():
    torch.manual_seed(0)
    ref = TorchRandom(128)
    ours = PositionEmbeddingRandom(128, rngs=nnx.Rngs(1))
    load_state_dict(ours, state_dict_numpy(ref))
    np.testing.assert_allclose(np.asarray(ours((16, 16))), to_numpy(ref((16, 16))).transpose(1, 2, 0), atol=2e-5)
    pts = torch.rand(2, 5, 2) * 256
    np.testing.assert_allclose(np.asarray(ours.forward_with_coords(jnp.asarray(pts.numpy()), (256, 256))),
                               to_numpy(ref.forward_with_coords(pts, (256, 256))), atol=2e-5)
