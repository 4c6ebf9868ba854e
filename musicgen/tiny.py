"""A tiny, untrained DiffRhythm with seeded random weights, written in the official formats.

It exists for offline demos and tests: the files are loaded by exactly the code that loads the real
weights (a `cfm_model.pt`, a TorchScript `vae_model.pt` with `decode_export` / `encode_export`, and a
MuQ-MuLan folder written by `save_pretrained`, whose text and audio towers are themselves tiny
`save_pretrained` folders). Its output is noise-like audio of the right shape: it is NOT a music model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from musicgen.model.dit import DiT, DiTConfig
from musicgen.model.loading import DIT_FILE, VAE_FILE, save_dit_checkpoint
from musicgen.model.vae import LATENT_CHANNELS, LATENT_HOP
from musicgen.registry import TINY_DIT

STYLE_DIM = 512
FORMAT_VERSION = 2  # bump when the files written here change
_TEXT_WORDS = [
    "pop",
    "rock",
    "jazz",
    "blues",
    "folk",
    "piano",
    "guitar",
    "drums",
    "bass",
    "synth",
    "female",
    "male",
    "vocal",
    "vocals",
    "happy",
    "sad",
    "upbeat",
    "fast",
    "slow",
    "song",
    "with",
    "and",
    "a",
    "the",
    "energetic",
    "calm",
    "electronic",
    "acoustic",
    "dance",
    "ballad",
]


class TinyVAE(nn.Module):
    """Latents (b, 64, t) <-> stereo audio (b, 2, t * 2048), with a 3-frame receptive field."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv1d(LATENT_CHANNELS, LATENT_CHANNELS, kernel_size=3, padding=1)
        self.up = nn.ConvTranspose1d(LATENT_CHANNELS, 2, kernel_size=LATENT_HOP, stride=LATENT_HOP)
        self.down = nn.Conv1d(2, 2 * LATENT_CHANNELS, kernel_size=LATENT_HOP, stride=LATENT_HOP)

    @torch.jit.export
    def decode_export(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.up(self.mix(latents)))

    @torch.jit.export
    def encode_export(self, audio: torch.Tensor) -> torch.Tensor:
        return self.down(audio)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_export(latents)


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vae = TinyVAE().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(vae).save(str(path))
    return path


def save_tiny_dit(path: Path, cfg: DiTConfig = TINY_DIT, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = DiT(cfg)
    # the official init zeroes the text-fusion layers; give them weights so that lyrics matter here
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    return save_dit_checkpoint(model, path)


def save_tiny_mulan(folder: Path, seed: int = 0) -> Path:
    """A MuQ-MuLan folder (save_pretrained) whose towers are tiny local folders under `folder`."""
    from muq import MuQ, MuQMuLan
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        Wav2Vec2ConformerConfig,
        XLMRobertaConfig,
        XLMRobertaModel,
        XLMRobertaTokenizerFast,
    )

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    # the muq package picks the tower type from these substrings of the model name
    text_dir, audio_dir = folder / "tiny-xlm-roberta", folder / "tiny-muq"

    words = ["<s>", "<pad>", "</s>", "<unk>", *_TEXT_WORDS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<unk>",
        model_max_length=64,
    ).save_pretrained(text_dir)
    xlmr = XLMRobertaConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=70,
        pad_token_id=1,
    )
    XLMRobertaModel(xlmr).save_pretrained(text_dir)

    w2v2 = Wav2Vec2ConformerConfig(
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        num_hidden_layers=1,
        conv_depthwise_kernel_size=3,
        position_embeddings_type="relative",
    ).to_dict()
    for key in ("id2label", "label2id"):  # int-keyed dicts that the muq package cannot take
        w2v2.pop(key, None)
    muq_cfg = dict(
        encoder_dim=32,
        encoder_depth=1,
        conv_dim=8,
        codebook_size=16,
        w2v2_config=w2v2,
        stat={"melspec_2048_mean": 6.0, "melspec_2048_std": 3.0},
    )
    MuQ(muq_cfg).save_pretrained(audio_dir, config=muq_cfg)

    tower = dict(tf_depth=1, heads=2, dim_head=8, attn_dropout=0.0, ff_dropout=0.0, ff_mult=2)
    mulan_cfg = dict(
        mulan=dict(
            sr=24000,
            clip_secs=10,
            dim_latent=STYLE_DIM,
            decoupled_contrastive_learning=True,
            hierarchical_contrastive_loss=False,
            hierarchical_contrastive_loss_layers=None,
            sigmoid_contrastive_loss=False,
            rank_contrast=True,
        ),
        audio_model=dict(name=str(audio_dir), model_dim=32, use_layer_idx=-1),
        text_model=dict(name=str(text_dir), model_dim=32),
        audio_transformer=dict(dim=16, **tower),
        text_transformer=dict(dim=16, max_seq_len=64, **tower),
    )
    MuQMuLan(mulan_cfg).save_pretrained(folder / "mulan", config=mulan_cfg)
    return folder / "mulan"


def tiny_paths(root: Path) -> dict[str, Path]:
    return {"dit": root / DIT_FILE, "vae": root / VAE_FILE, "mulan": root / "mulan/mulan",
            "negative": root / "negative_style.npy"}  # fmt: skip


def save_tiny_negative_style(path: Path) -> Path:
    """The tiny model's own negative style embedding, in the official file's format ((1, 512) fp32
    .npy): an untrained model has no use for the official one, so the offline demo needs no download."""
    import numpy as np

    g = torch.Generator().manual_seed(7)
    emb = torch.randn(1, STYLE_DIM, generator=g)
    np.save(path, (emb / emb.norm()).numpy().astype(np.float32))
    return path


def _build_once(root: Path, version: int, build) -> None:
    """Run `build()` into an empty `root` unless a finished build of this format is there. The marker
    file is written last, so a build that was interrupted is redone from scratch on the next call
    rather than used half-made."""
    marker = root / "tiny.json"
    if marker.is_file() and json.loads(marker.read_text()).get("format") == version:
        return
    if root.exists():
        shutil.rmtree(root)
    build()
    marker.write_text(json.dumps({"format": version, "untrained": True}))


def ensure_tiny_model(root: Path) -> dict[str, Path]:
    """Build the tiny model under `root` once."""
    paths = tiny_paths(root)

    def build():
        save_tiny_dit(paths["dit"])
        save_tiny_vae(paths["vae"])
        save_tiny_mulan(root / "mulan")  # MuQ-MuLan records its towers' absolute paths: build in place
        save_tiny_negative_style(paths["negative"])

    _build_once(root, FORMAT_VERSION, build)
    return paths


# -- DiffRhythm 2 ------------------------------------------------------------------------------------

DR2_FORMAT_VERSION = 1


def save_tiny_dr2(folder: Path, seed: int = 0) -> Path:
    """A tiny DiffRhythm 2 DiT and BigVGAN decoder in the official files (model.json, model.safetensors,
    decoder.json, decoder.bin with weight-norm pairs), seeded random weights."""
    from musicgen.model.bigvgan import BigVGAN, DecoderConfig
    from musicgen.model.dr2_dit import DR2Config, DR2DiT
    from musicgen.model.loading import save_bigvgan, save_dr2

    torch.manual_seed(seed)
    dit = DR2DiT(DR2Config(dim=64, depth=2, heads=4, text_num_embeds=1000, block_size=10,
                           extra={"text_dim": 512, "use_flex_attn": False}))  # fmt: skip
    save_dr2(dit, folder)
    decoder = BigVGAN(
        # one residual kernel per stage (the release has three): a quarter of the decoding time on a CPU
        DecoderConfig(
            upsample_initial_channel=64,
            resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1, 3),),
            use_tanh_at_final=False,
            use_bias_at_final=False,
        )  # fmt: skip
    )
    save_bigvgan(decoder, folder)  # its anti-alias filters are the official ones (BigVGAN starts with them)
    return folder


def ensure_tiny_dr2(root: Path) -> dict[str, Path]:
    """Build the tiny DiffRhythm 2 under `root` once."""
    paths = {"folder": root / "model", "mulan": root / "mulan" / "mulan"}

    def build():
        save_tiny_dr2(paths["folder"])
        save_tiny_mulan(root / "mulan")

    _build_once(root, DR2_FORMAT_VERSION, build)
    return paths
