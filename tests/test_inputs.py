"""guess_inputs: an example input from what the model declares, checked by running it once."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from normswap.inputs import GuessedInputs, default_example_inputs, guess_inputs
from tests.conftest import assert_same_state, randomize_bn, state_snapshot


def _runs(model: nn.Module, guess: GuessedInputs) -> None:
    with torch.no_grad():
        model.eval()(*guess.args, **guess.kwargs)


# -- declared sizes ---------------------------------------------------------------------------

def test_timm_pretrained_cfg_size() -> None:
    import timm

    model = timm.create_model("test_resnet", pretrained=False)
    assert model.pretrained_cfg["input_size"] == (3, 160, 160)
    guess = guess_inputs(model)
    assert guess is not None and guess.source == "timm pretrained_cfg"
    assert guess.shapes == [[2, 3, 160, 160]] and guess.tried == ()
    assert guess.describe() == ("a generated input of shape [2, 3, 160, 160] "
                                "(from timm pretrained_cfg)")
    # a ViT with a fixed input size only runs at its declared size
    vit = timm.create_model("test_vit", pretrained=False)
    guess = guess_inputs(vit)
    assert guess is not None and guess.shapes == [[2, 3, 160, 160]]


def test_hugging_face_resnet_has_channels_but_no_size() -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(
        num_channels=4, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    guess = guess_inputs(model)
    assert guess is not None
    assert guess.source == "Hugging Face config (num_channels=4)"
    assert guess.shapes == [[2, 4, 64, 64]]
    _runs(model, guess)


def test_hugging_face_mobilevit_uses_the_config_image_size() -> None:
    from transformers import MobileViTConfig, MobileViTModel

    config = MobileViTConfig(image_size=96, patch_size=2, hidden_sizes=[16, 24, 32],
                             neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2)
    guess = guess_inputs(MobileViTModel(config))
    assert guess is not None and guess.shapes == [[2, 3, 96, 96]]
    assert guess.source == "Hugging Face config (image_size=[96, 96], num_channels=3)"


def test_hugging_face_vit_needs_exactly_its_image_size() -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=48, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)
    model = ViTModel(config)
    guess = guess_inputs(model)
    assert guess is not None and guess.shapes == [[2, 3, 48, 48]]
    _runs(model, guess)


def test_hugging_face_text_model_gets_token_ids() -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=12)
    guess = guess_inputs(BertModel(config))
    assert guess is not None and guess.source == "Hugging Face config (vocab_size=50)"
    (ids,) = guess.args
    assert ids.dtype == torch.long and list(ids.shape) == [2, 8]  # 16 > 12 positions
    assert int(ids.min()) >= 0 and int(ids.max()) < 50


def test_torchvision_detection_gets_a_list_of_images() -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                  num_classes=3).eval()
    guess = guess_inputs(model)
    assert guess is not None and guess.source == "torchvision detection model"
    (images,) = guess.args
    assert isinstance(images, list) and [list(i.shape) for i in images] == [[3, 224, 224]] * 2
    assert 0.0 <= float(torch.stack(images).min()) and float(torch.stack(images).max()) <= 1.0
    assert "a list of 2 tensors of shape [3, 224, 224]" in guess.describe()
    with torch.no_grad():  # a 4-D batch works as well: the transform iterates over dim 0
        assert len(model(torch.stack(images))) == 2


def test_ultralytics_model_gets_a_multiple_of_its_stride() -> None:
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", ch=3, nc=2, verbose=False)
    guess = guess_inputs(model)
    assert guess is not None and guess.source.startswith("ultralytics yaml (ch=3")
    assert guess.shapes == [[2, 3, 64, 64]]


# -- from the first layers --------------------------------------------------------------------

class SpeechConv1d(nn.Module):
    """speechbrain-style: ``kernel_size`` a plain int, input (batch, time, channels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.in_channels, self.kernel_size = in_channels, kernel_size
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def test_int_kernel_size_and_channels_last_speech_conv() -> None:
    model = nn.Sequential(SpeechConv1d(40, 8, 3), nn.ReLU(), nn.Linear(8, 2))
    guess = guess_inputs(model)
    assert guess is not None and guess.source == "first layer SpeechConv1d '0'"
    assert guess.shapes == [[2, 128, 40]]  # channels-last, after the channels-first tries failed
    assert guess.tried and guess.tried[0].startswith("first layer SpeechConv1d '0' [2, 40, 128]")
    assert default_example_inputs(model) is not None  # the old helper crashed on an int kernel


class Only32(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"expected 32x32 images, got {tuple(x.shape[-2:])}")
        return self.fc(self.conv(x).flatten(1))


def test_model_that_needs_exactly_32x32() -> None:
    guess = guess_inputs(Only32())
    assert guess is not None and guess.shapes == [[2, 3, 32, 32]]
    assert [t.split(": ")[0] for t in guess.tried] == [
        "first layer Conv2d 'conv' [2, 3, 64, 64]", "first layer Conv2d 'conv' [2, 3, 224, 224]"]
    assert "expected 32x32 images" in guess.tried[0]


def test_embedding_first_model_gets_token_ids() -> None:
    model = nn.Sequential(nn.Embedding(30, 8), nn.LSTM(8, 4, batch_first=True))
    guess = guess_inputs(model)
    assert guess is not None and guess.source == "first layer Embedding '0'"
    (ids,) = guess.args
    assert ids.dtype == torch.long and list(ids.shape) == [2, 16] and int(ids.max()) < 30


def test_rnn_first_and_layer_norm_first() -> None:
    guess = guess_inputs(nn.GRU(6, 4))  # not batch_first: (time, batch, features)
    assert guess is not None and guess.shapes == [[16, 2, 6]]
    guess = guess_inputs(nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 2)))
    assert guess is not None and guess.shapes == [[2, 10]]


class HeadFirst(nn.Module):
    """Declares its classifier before its stem: module order misleads, the graph does not."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.stem = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(self.stem(x)).mean((2, 3)))


def test_graph_order_finds_the_real_first_layer() -> None:
    model = randomize_bn(HeadFirst()).eval()
    by_modules = guess_inputs(model)
    assert by_modules is not None and by_modules.source == "first layer Conv2d 'stem'"
    assert by_modules.tried  # the Linear was tried first and failed
    by_graph = guess_inputs(model, graph=fx.symbolic_trace(model))
    assert by_graph is not None and by_graph.source == "first layer Conv2d 'stem'"
    assert by_graph.tried == ()
    gm = fx.symbolic_trace(model)
    assert guess_inputs(gm) is not None and guess_inputs(gm).tried == ()  # its own graph


def test_keyword_only_input() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, *, image: Tensor) -> Tensor:
            return self.bn(image)

    guess = guess_inputs(Kw())
    assert guess is not None and guess.args == () and list(guess.kwargs) == ["image"]
    assert guess.describe().startswith("a generated input of image=shape [2, 3, 64, 64]")
    assert default_example_inputs(Kw()) is None  # the positional-only helper cannot say it


def test_unchecked_guess() -> None:
    guess = guess_inputs(Only32(), run=False)
    assert guess is not None and not guess.checked and guess.shapes == [[2, 3, 64, 64]]


# -- failures are None with a reason, never an exception, and leave no state ------------------

def test_every_guess_fails_gives_none_with_reasons() -> None:
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("needs a calibrated camera")

    reasons: list[str] = []
    assert guess_inputs(Picky(), reasons=reasons) is None
    assert len(reasons) > 5 and all("needs a calibrated camera" in r for r in reasons)


def test_two_required_inputs_and_no_layers_give_reasons() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return self.bn(a + b)

    reasons: list[str] = []
    assert guess_inputs(TwoInputs(), reasons=reasons) is None
    assert reasons == ["forward() of TwoInputs needs 2 inputs (a, b); only a single input can "
                       "be generated"]
    reasons = []
    assert guess_inputs(nn.ReLU(), reasons=reasons) is None
    assert "declares no input size" in reasons[0]


def test_hostile_attributes_do_not_crash() -> None:
    class Hostile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        @property
        def pretrained_cfg(self) -> dict:  # type: ignore[override]
            raise KeyError("broken config")

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    guess = guess_inputs(Hostile())  # the broken source is passed over, with its reason
    assert guess is not None and guess.source == "first layer Conv2d 'conv'"
    assert guess.tried[0] == "timm pretrained_cfg: could not be read (KeyError: 'broken config')"

    class Unsized(Hostile):
        def named_modules(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            raise RuntimeError("no modules today")

    reasons: list[str] = []
    assert guess_inputs(Unsized(), reasons=reasons) is None  # never an exception
    assert any("no modules today" in r for r in reasons), reasons

    class BadCfg(nn.Module):  # a timm-like cfg with nonsense in it is ignored
        pretrained_cfg = {"input_size": ("3", None)}

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x)

    guess = guess_inputs(BadCfg())
    assert guess is not None and guess.shapes == [[2, 4]]


class Stateful(nn.Module):
    """Counts calls, caches the last input, moves a buffer and draws random numbers in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("seen", torch.zeros(1))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 64:
            raise ValueError("64 only")
        self.calls += 1
        self.cache = x
        self.seen.add_(1)
        self.bn.running_mean.add_(1.0)
        return self.bn(x) + torch.randn_like(x)


def test_guessing_leaves_no_state_behind() -> None:
    model = randomize_bn(Stateful()).train()
    before = state_snapshot(model)
    rng = torch.random.get_rng_state()
    guess = guess_inputs(model)
    assert guess is not None and guess.shapes == [[2, 3, 64, 64]]
    assert model.calls == 0 and not hasattr(model, "cache")
    assert_same_state(before, state_snapshot(model))
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)
