"""Training data: what a code store is, how it is made, and how the trainer reads it.

    format.py        the on-disk code store (codes, labels, optional encoder features; CodeStore, CodeStoreWriter)
    images.py        images in and out: reading, the ADM / ten-crop augmentations, uint8 conversion and grids
    image_folder.py  an ImageNet-style folder's classes, files and labels, in row order
    prepare.py       image folder -> code store (tokenizer codes, encoder features), resumable, multi-rank
    synthetic.py     small synthetic stores (tests, configs/debug.yaml, benchmarks)
    loader.py        TrainLoader: the trainer's sharded, resumable loader over a store
    store_images.py  the original image crops of a store's rows (Mirai-I with the encoder run online)
"""
