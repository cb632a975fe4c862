"""Tiny random-weight versions of the dataset builder's models, built in-process from configs (no network)."""

from __future__ import annotations

import torch

from tiny import randomize, tiny_pipeline, tiny_tokenizer

NOUNS = ["dog", "cat", "hat", "backpack", "can", "candle", "clock", "boot", "toy", "bowl", "sneaker", "beach"]


def tiny_captioner(seed: int = 0):
    """BLIP-2 with a T5 language model (the paper's flan-t5 kind), hidden sizes 16-32."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                              T5Config)

    from lambda_eclipse.dataset.caption import Captioner

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer)
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, encoder_hidden_size=16, max_position_embeddings=64),
        text_config=T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                             decoder_start_token_id=1, pad_token_id=1, eos_token_id=1).to_dict(),
        num_query_tokens=4, image_token_index=image_token,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    randomize(model.language_model, 0.5)  # at init the tiny T5 emits EOS at once; random weights write words
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=4)
    return Captioner(model, processor)


def tiny_spacy():
    """A blank English pipeline whose attribute ruler tags the test nouns as NOUN (no parser, no download)."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    ruler.add([[{"LOWER": {"IN": NOUNS}}]], {"POS": "NOUN"})
    return nlp


def tiny_detector(seed: int = 0):
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor, ResNetConfig)

    from lambda_eclipse.dataset.ground import Detector

    torch.manual_seed(seed)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "photo", "of", "the", *NOUNS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = GroundingDinoConfig(
        backbone_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 32], depths=[1, 1, 1, 1],
                                     out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64),
        num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer)
    return Detector(model, processor)


def tiny_segmenter(seed: int = 0):
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    from lambda_eclipse.dataset.segment import Segmenter

    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[0], num_pos_feats=8,
                           mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    processor = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64},
                                                                  pad_size={"height": 64, "width": 64}))
    return Segmenter(SamModel(config).eval(), processor)


def tiny_encoders(seed: int = 0):
    from lambda_eclipse.dataset import ClipEncoders

    return ClipEncoders.from_pipeline(tiny_pipeline(seed))


def tiny_models(seed: int = 0, captioner: bool = False) -> dict:
    """The builder's models, tiny, under the names :func:`lambda_eclipse.dataset.build_dataset` accepts (BLIP-2
    only when asked: a random captioner writes random words, so end-to-end tests keep the inputs' captions)."""
    models = {"nlp": tiny_spacy(), "detector": tiny_detector(seed), "segmenter": tiny_segmenter(seed),
              "encoders": tiny_encoders(seed)}
    return {**models, "captioner": tiny_captioner(seed)} if captioner else models
