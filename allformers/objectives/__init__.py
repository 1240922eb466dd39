"""Training objectives. Each one is a callable `objective(model, batch) -> scalar loss`, so
the one Trainer serves them all (causal LM, MLM/TLM, NSP/SOP, ELECTRA, DistilBERT, LaBSE, seq2seq with
T5 span corruption and BART denoising; XLNet's permutation LM, Transformer-XL's segment recurrence;
reward models, PPO later).

An objective may also define `num_tokens(batch) -> int` (tokens/s and MFU count these);
without it the Trainer counts the elements of the batch's first tensor."""
from .causal_lm import IGNORE_INDEX, CausalLM, causal_lm_loss
from .denoising import (BartNoiser, DenoisingData, document_rotation, sentence_permutation, text_infilling,
                        token_deletion, token_masking)
from .distill import (DISTILBERT_EXTRACT_LAYERS, Distillation, cosine_hidden_loss, distillation_loss,
                      init_student_from_teacher, soft_target_loss)
from .electra import (DISC_WEIGHT, Electra, ElectraPretraining, corrupt, discriminator_loss, electra_loss,
                      original_ids, tie_embeddings)
from .ernie import NO_ENTITY, dea_loss, dea_noise
from .labse import TranslationRanking, additive_margin_loss, translation_ranking_loss
from .mlm import (MaskedLM, MaskedLMData, MLMCollator, MLMMasker, ObjectiveError, build_tlm_batch, mask_tokens,
                  masked_cross_entropy, mlm_loss, special_token_ids)
from .nsp import (SentencePairPrediction, build_nsp_examples, build_pair_examples, build_sop_examples,
                  sentence_pair_loss, truncate_pair)
from .permutation_lm import PermutationLM, PermutationLMData, permutation_lm_batch, permutation_lm_loss, permutation_masks
from .segment_lm import SegmentLM, SegmentStream
from .seq2seq import Seq2SeqExamples, Seq2SeqLoss, seq2seq_loss
from .span_corruption import SpanCorruptionData, random_spans_noise_mask, reassemble, span_corruption

__all__ = ["CausalLM", "causal_lm_loss", "IGNORE_INDEX",
           "MLMMasker", "mask_tokens", "mlm_loss", "masked_cross_entropy", "MaskedLM", "MaskedLMData", "MLMCollator",
           "build_tlm_batch", "special_token_ids", "ObjectiveError",
           "build_nsp_examples", "build_sop_examples", "build_pair_examples", "truncate_pair", "sentence_pair_loss",
           "SentencePairPrediction",
           "ElectraPretraining", "Electra", "electra_loss", "corrupt", "discriminator_loss", "original_ids",
           "tie_embeddings", "DISC_WEIGHT",
           "Distillation", "distillation_loss", "soft_target_loss", "cosine_hidden_loss", "init_student_from_teacher",
           "DISTILBERT_EXTRACT_LAYERS",
           "dea_noise", "dea_loss", "NO_ENTITY",
           "TranslationRanking", "translation_ranking_loss", "additive_margin_loss",
           "Seq2SeqLoss", "seq2seq_loss", "Seq2SeqExamples",
           "span_corruption", "random_spans_noise_mask", "reassemble", "SpanCorruptionData",
           "token_masking", "token_deletion", "text_infilling", "sentence_permutation", "document_rotation",
           "BartNoiser", "DenoisingData",
           "PermutationLM", "PermutationLMData", "permutation_lm_batch", "permutation_lm_loss", "permutation_masks",
           "SegmentLM", "SegmentStream"]
