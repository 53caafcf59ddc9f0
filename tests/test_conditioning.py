"""ADM vector / micro-conditioning against the sgm oracle (fourier.safetensors)."""
import pytest
import torch

from sdxl_model import conditioning as C

from .conftest import FIXTURES

SGM = FIXTURES / "sgm"


@pytest.fixture(scope="module")
def fourier():
    path = SGM / "fourier.safetensors"
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    from safetensors.torch import load_file
    return load_file(str(path))


def test_base_micro_conditioning_matches_sgm(fourier):
    got = C.micro_conditioning(fourier["original_size"], fourier["crop_coords_top_left"], fourier["target_size"])
    assert got.shape == (2, C.BASE_MICRO_DIM)
    torch.testing.assert_close(got, fourier["base_vector_without_pooled"], atol=1e-5, rtol=0)


def test_refiner_micro_conditioning_matches_sgm(fourier):
    got = C.refiner_micro_conditioning(fourier["original_size"], fourier["crop_coords_top_left"],
                                       fourier["aesthetic_score"])
    assert got.shape == (2, C.REFINER_MICRO_DIM)
    torch.testing.assert_close(got, fourier["refiner_vector_without_pooled"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("refiner", [False, True])
def test_build_adm_vector_layout(fourier, refiner):
    pooled = torch.randn(2, C.POOLED_DIM)
    kw = dict(aesthetic_score=fourier["aesthetic_score"]) if refiner else dict(target_size=fourier["target_size"])
    y = C.build_adm_vector(pooled, fourier["original_size"], fourier["crop_coords_top_left"], refiner=refiner, **kw)
    want = fourier["refiner_vector_without_pooled" if refiner else "base_vector_without_pooled"]
    assert y.shape == (2, C.REFINER_ADM_DIM if refiner else C.BASE_ADM_DIM)
    assert torch.equal(y[:, :C.POOLED_DIM], pooled)  # pooled first, as sgm's embedder order gives
    torch.testing.assert_close(y[:, C.POOLED_DIM:], want, atol=1e-5, rtol=0)


def test_out_slice_written_in_place(fourier):
    y = torch.zeros(2, C.BASE_ADM_DIM)
    ret = C.micro_conditioning(fourier["original_size"], fourier["crop_coords_top_left"], fourier["target_size"],
                               out=y[:, C.POOLED_DIM:])
    assert ret.data_ptr() == y[:, C.POOLED_DIM:].data_ptr()
    assert torch.all(y[:, :C.POOLED_DIM] == 0)
    torch.testing.assert_close(y[:, C.POOLED_DIM:], fourier["base_vector_without_pooled"], atol=1e-5, rtol=0)


def test_pairs_broadcast_over_batch(fourier):
    y = C.build_adm_vector(torch.zeros(3, C.POOLED_DIM), (1024, 1024), (0, 0), (1024, 1024))
    assert y.shape == (3, C.BASE_ADM_DIM)
    torch.testing.assert_close(y[:, C.POOLED_DIM:], fourier["base_vector_without_pooled"][:1].expand(3, -1),
                               atol=1e-5, rtol=0)
    r = C.build_adm_vector(torch.zeros(2, C.POOLED_DIM), (1024, 1024), (0, 0), refiner=True, aesthetic_score=6.0)
    torch.testing.assert_close(r[:1, C.POOLED_DIM:], fourier["refiner_vector_without_pooled"][:1], atol=1e-5, rtol=0)


def test_bfloat16_pooled():
    y = C.build_adm_vector(torch.zeros(1, C.POOLED_DIM, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (1, C.BASE_ADM_DIM)
    ref = C.micro_conditioning((1024, 1024), (0, 0), (1024, 1024))
    torch.testing.assert_close(y[:, C.POOLED_DIM:].float(), ref, atol=1e-2, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="pooled"):
        C.build_adm_vector(torch.zeros(1, 768))
    with pytest.raises(ValueError, match="original_size"):
        C.micro_conditioning((1, 2, 3), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="disagree"):
        C.micro_conditioning(torch.ones(2, 2), torch.ones(3, 2), (1, 1))
    with pytest.raises(ValueError, match="refiner"):
        C.build_adm_vector(torch.zeros(1, C.POOLED_DIM), aesthetic_score=6.0)
