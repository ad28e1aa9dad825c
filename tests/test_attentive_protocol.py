"""CAE's attentive probe as Appendix A trains it: the frozen encoder computes the patch tokens of augmented batches
(RandomResizedCrop + flip, as the official run_attentive.py), in eval mode and without gradient; 90 epochs, 10
warm-up, batch 8192, lr 0.4 by default. The report, the demo and the CPU benchmarks keep a small cached recipe."""
import timm
import torch

from mimkit.data import build_dataset
from mimkit.eval.attentive import CPU_SMALL, attentive_protocol_top1, load_attentive_recipe
from mimkit.eval.features import subset


def test_the_default_recipe_is_appendix_a_and_the_small_one_is_named_so():
    cae = load_attentive_recipe()
    assert (cae.epochs, cae.warmup_epochs, cae.batch_size, cae.lr, cae.lr_batch, cae.augment) == (90, 10, 8192, 0.4,
                                                                                                   8192, True)
    small = load_attentive_recipe(CPU_SMALL)
    assert (small.epochs, small.batch_size, small.augment) == (30, 1024, False)
    assert load_attentive_recipe(None, ["epochs=3"]).epochs == 3


def test_augmented_batches_go_through_the_frozen_encoder_every_epoch(fmnist_small):
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                                embed_dim=32, depth=1, num_heads=2, num_classes=0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []
    real = encoder.forward_features

    def recorded(x):
        seen.append((x.detach().clone(), encoder.training, torch.is_grad_enabled()))
        return real(x)
    encoder.forward_features = recorded
    train = subset(build_dataset(f"idx:{fmnist_small}", "train"), 64, 0)
    test = subset(build_dataset(f"idx:{fmnist_small}", "test"), 32, 0)
    cfg = load_attentive_recipe(None, ["epochs=2", "batch_size=64", "num_workers=0", "warmup_epochs=0"])
    top1 = attentive_protocol_top1(encoder, train, test, [28, 28], [0.286], [0.353], cfg)
    training = seen[:2]                                                   # one full batch per epoch, then the test
    assert len(seen) == 3 and all(not grad and not mode for _, mode, grad in seen)
    originals = torch.stack([(train[i][0].float() / 255 - 0.286) / 0.353 for i in range(64)])
    for images, _, _ in training:                                         # crops and flips, not the images themselves
        assert not any(torch.allclose(image, original, atol=1e-4) for image in images for original in originals)
    assert not torch.equal(training[0][0], training[1][0])
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())   # frozen
    assert 0 <= top1 <= 100
