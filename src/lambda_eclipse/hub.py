"""Hub ids of the released models, in a module of constants only: the CLI reads them without importing torch."""

DEFAULT_PRIOR = "ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0"  # the λ-ECLIPSE prior (subjects + edge map)
TEXT_ONLY_PRIOR = "ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior"  # its text-only ECLIPSE sibling
DEFAULT_ENCODERS = "kandinsky-community/kandinsky-2-2-prior"  # CLIP ViT-bigG/14 text + image encoders
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"  # Kandinsky 2.2 UNet, scheduler, MoVQ
PRIOR_ONLY_REPOS = (DEFAULT_PRIOR, TEXT_ONLY_PRIOR)  # repos holding a prior alone, composed with the two above
