"""Data: tokenizers, conversations -> ids + loss masks, image normalisation, built-in tasks.

  tokenizer.py     demo tokenizer (built offline) and checked loading of HF tokenizers
  conversation.py  chat messages / captions -> (ids, loss_mask, turn_ids) via the chat template
  images.py        CLIP / SigLIP normalisation
  synthetic.py     the "scenes" captioning + VQA task and its fixed-shape batches
  preference.py    built-in preference pairs of the scenes task
  records.py       LLaVA / caption / TRL preference files -> validated records
  tfds_builders.py TFDS array_record builders for those files
  pipeline.py      the grain pipeline: shuffle, shard, preprocess, buckets / packing, state
  packing.py       samples -> fixed-shape rows (padded, packed, preference pairs)
  export.py        the scenes task written out as LLaVA-format files
"""
