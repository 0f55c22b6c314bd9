"""Task ``longmem_language_modeling``: language modelling where each batch row reads its text in order.

Extends fairseq's ``language_modeling``. Every batch row is its own contiguous stream through the split
(``stream_dataset.py``), so the model's per-row memory holds that row's preceding text. The memory is
reset at the start of every epoch, kept apart from validation (which reads its own streams with its
own memory), and optionally reset at the document boundaries of each row
(``--memory-reset-at-document-boundary``). ``--data-no-shuffle`` gives the release's batch order
instead (docs/design.md §5.1; each row is then a contiguous stream of whole blocks); the release's
memory is the model's ``--memory-mode release``.

Importing this module also gives fairseq's own ``--task language_modeling`` the release's
``--data-no-shuffle`` flag (the release's command line uses it there): without the flag that task reads
and batches data as fairseq's does; with it, in the release's order as above.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import II

from fairseq.data import data_utils, iterators
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY, register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from longmem import optim_groups
from longmem.errors import ConfigError
from longmem.tasks.stream_dataset import StreamBatches, TokenStream, read_marks

logger = logging.getLogger(__name__)


@dataclass
class LongMemLanguageModelingConfig(LanguageModelingConfig):
    max_tokens: Optional[int] = II("dataset.max_tokens")  # bounds a batch's rows when --batch-size is unset
    memory_reset_at_document_boundary: bool = field(
        default=False, metadata={"help": "empty a row's memory where a new document starts in that row"})
    data_no_shuffle: bool = field(
        default=False, metadata={"help": "the release's batch order: blocks of --tokens-per-sample tokens cut "
                                         "into batch-size x ranks contiguous passages, batch i = the i-th block "
                                         "of each of this rank's passages (needs --sample-break-mode none)"})


class StreamEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's iterator over the streams' batches; on resume it says what continues and what does not.
    Its state records the row layout (``layout``: rows, segment length, ranks, order, stream length): a
    resume whose layout differs would continue "batch N" of other rows, skipping or rereading tokens, so it is
    refused naming each difference (``--reset-dataloader`` restarts the streams at the epoch's start instead)."""

    layout: dict = {}

    def state_dict(self):
        return {**super().state_dict(), "longmem_layout": dict(self.layout)}

    def load_state_dict(self, state_dict):
        recorded = state_dict.get("longmem_layout")
        if recorded and state_dict.get("iterations_in_epoch", 0):
            differ = [f"{k} {recorded[k]} -> {self.layout.get(k)}" for k in recorded if recorded[k] != self.layout.get(k)]
            if differ:
                raise ConfigError(f"resume: the checkpoint stopped mid-epoch with another row layout ({', '.join(differ)}): "
                                  f"continuing would skip or reread tokens; resume with the settings it was trained "
                                  f"with, or add --reset-dataloader to restart the streams at the epoch's start")
        super().load_state_dict(state_dict)
        done = state_dict.get("iterations_in_epoch", 0)
        if done:
            logger.warning("resuming epoch %d at batch %d of %d: every row of every rank continues its stream where "
                           "it stopped; the memory starts empty (it is not saved in checkpoints, as in the release) "
                           "and refills as the rows read on", self.epoch, done, len(self))


def model_memory(model):
    """The memory controller of a (possibly wrapped) LongMem model, or None for a model without memory."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return getattr(getattr(model, "decoder", None), "memory", None)


@register_task("longmem_language_modeling", dataclass=LongMemLanguageModelingConfig)
class LongMemLanguageModelingTask(LanguageModelingTask):
    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        decoder = getattr(model, "decoder", None)
        if not from_checkpoint and getattr(decoder, "backbone_loaded", True) is False:
            raise ConfigError(f"--pretrained-model-path {cfg.pretrained_model_path!r} does not exist: training needs "
                              f"the frozen backbone's checkpoint (e.g. gpt2_medium/checkpoint_last.pt)")
        memory = model_memory(model)
        if memory is not None:  # also reached by fairseq-eval-lm, which runs no train/valid step
            memory.configure(reset_at_document_boundaries=self.args.memory_reset_at_document_boundary)
            self._refuse_memory_settings_that_cannot_act(memory)
        return model

    def _refuse_memory_settings_that_cannot_act(self, memory) -> None:
        """Settings that would be ignored or fail later, refused in one line before any work."""
        settings, T = memory.settings, self.args.tokens_per_sample
        if self.args.memory_reset_at_document_boundary and settings.mode != "stream":
            raise ConfigError(f"--memory-reset-at-document-boundary empties one batch row's memory where its document "
                              f"ends, which needs --memory-mode stream (a memory per row); with --memory-mode "
                              f"{settings.mode} the rows share one memory and the flag would do nothing: drop it or use "
                              f"--memory-mode stream")
        memory.check_segment(T, rows=self._most_rows_per_batch() if memory.enabled and settings.mode == "release"
                             else None)

    def _most_rows_per_batch(self):
        """The most rows a batch can hold: --batch-size, or --max-tokens // --tokens-per-sample when only the
        token budget bounds it (a batch of whole segments), the smaller of the two when both are set."""
        from omegaconf import OmegaConf

        T = self.args.tokens_per_sample
        if OmegaConf.is_config(self.args):  # a task config built alone has no dataset section to interpolate
            read = lambda name: OmegaConf.select(self.args, name, throw_on_resolution_failure=False)  # noqa: E731
        else:
            read = lambda name: getattr(self.args, name, None)  # noqa: E731
        max_tokens = read("max_tokens")
        bounds = [b for b in (read("batch_size"), max_tokens and max_tokens // T) if b]
        return min(bounds) if bounds else None

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if self.args.data_no_shuffle and self.args.sample_break_mode != "none":
            raise ConfigError(f"--data-no-shuffle reads the release's order over blocks of --tokens-per-sample "
                             f"tokens: use --sample-break-mode none (got {self.args.sample_break_mode!r})")
        paths = self.args.data.split(":")
        data_path = paths[(epoch - 1) % len(paths)]  # fairseq's data shards, one per epoch in turn
        split_path = f"{data_path}/{split}"
        dataset = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if dataset is None:
            raise ConfigError(f"split {split!r} not found in {data_path} (no {split}.bin/.idx): binarize it "
                              f"(fairseq-preprocess --{split if split in ('train', 'valid', 'test') else 'valid'}pref), choose another "
                              f"with --valid-subset, or pass --disable-validation")
        marks_path = f"{split_path}.marks"  # which documents --distill-on marked distils whole (the recipe's broad pieces)
        marks = read_marks(marks_path) if os.path.isfile(marks_path) else None
        self.datasets[split] = TokenStream(dataset, self.dictionary.eos(), marks, marks_path)
        stream = self.datasets[split]
        logger.info("%s: %d tokens, %d documents as one stream%s", split, len(stream), int(stream.doc_start.sum()),
                    "" if marks is None else f", {int(marks.sum())} of them marked ({marks_path})")

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, skip_remainder_batch=False, grouped_shuffling=False,
                           update_epoch_batch_itr=False):
        if not isinstance(dataset, TokenStream):
            return super().get_batch_iterator(
                dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                required_batch_size_multiple, seed, num_shards, shard_id, num_workers, epoch, data_buffer_size,
                disable_iterator_cache, skip_remainder_batch, grouped_shuffling, update_epoch_batch_itr)
        if max_sentences is None:
            raise ConfigError("longmem_language_modeling needs --batch-size: each row is one memory stream")
        if max_sentences % required_batch_size_multiple:
            raise ConfigError(f"--batch-size {max_sentences} is not a multiple of "
                             f"--required-batch-size-multiple {required_batch_size_multiple}")
        batches = StreamBatches(dataset, max_sentences, self.args.tokens_per_sample, self.dictionary.pad(),
                                num_shards, shard_id, layout="release" if self.args.data_no_shuffle else "streams")
        if batches.layout == "release" and len(batches) == 0:
            raise ConfigError(f"--data-no-shuffle: a split of {len(dataset)} tokens gives no batch of {max_sentences} "
                             f"rows x {num_shards} rank(s) in the release's order (blocks of "
                             f"{self.args.tokens_per_sample} tokens, one passage per row, all as long as the "
                             f"shortest): use more data, fewer rows, or --disable-validation for a short valid split "
                             f"(as the release's recipe does)")
        if batches.layout == "release" and len(batches) > 1:
            logger.info("release order, rank %d: batch 0 = samples %s, batch 1 = samples %s", shard_id,
                        batches.sample_ids(0).tolist(), batches.sample_ids(1).tolist())
        iterator = StreamEpochBatchIterator(
            dataset=batches, collate_fn=batches.collater, batch_sampler=[[i] for i in range(len(batches))],
            seed=seed, num_shards=1, shard_id=0, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size, disable_shuffling=True,  # the order is the point
        )
        iterator.layout = {"rows": max_sentences, "tokens_per_sample": self.args.tokens_per_sample, "ranks": num_shards,
                           "order": batches.layout, "stream_tokens": len(dataset)}
        return iterator

    # ------------------------------------------------------------ memory bookkeeping
    def begin_epoch(self, epoch, model):
        memory = model_memory(model)
        if memory is not None:
            memory.reset(slot="train")

    def begin_valid_epoch(self, epoch, model):
        memory = model_memory(model)
        if memory is not None:
            memory.reset(slot="valid")

    def _with_memory_slot(self, model, slot, sample):
        memory = model_memory(model)
        if memory is not None:
            memory.configure(slot=slot)  # the reset flag was set once, in build_model
        elif sample and "net_input" in sample:
            sample["net_input"].pop("doc_start", None)  # models without memory take no such input

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self._with_memory_slot(model, "train", sample)
        optim_groups.check_reached(model, optimizer)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self._with_memory_slot(model, "valid", sample)
        return super().valid_step(sample, model, criterion)


class ReleaseLanguageModelingTask(LongMemLanguageModelingTask):
    """fairseq's ``language_modeling`` with the release's ``--data-no-shuffle``: without the flag the data
    is read and batched by fairseq's own code; with it, in the release's order. A LongMem model's memory
    is emptied at each epoch (as the release's training loop does) and validation keeps its own."""

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if not self.args.data_no_shuffle:
            return LanguageModelingTask.load_dataset(self, split, epoch, combine, **kwargs)
        return super().load_dataset(split, epoch, combine, **kwargs)


def _install_release_language_modeling():
    """`--task language_modeling` becomes fairseq's task plus --data-no-shuffle (and this task's memory
    flags), in the registries fairseq's parser and config composition read."""
    from hydra.core.config_store import ConfigStore

    TASK_REGISTRY["language_modeling"] = ReleaseLanguageModelingTask
    TASK_DATACLASS_REGISTRY["language_modeling"] = LongMemLanguageModelingConfig
    node = LongMemLanguageModelingConfig()
    node._name = "language_modeling"
    ConfigStore.instance().store(name="language_modeling", group="task", node=node, provider="longmem")


_install_release_language_modeling()
