"""Training HART: the tokenizer, the AR transformer and its residual-diffusion MLP.

`scenes` (the procedural captioned-scene dataset), `common` (the resumable loop),
`tokenizer`, `transformer`, `diffusion_loss` (the three parts' losses),
`finetune` (captioned image folders, fine-tuning an official folder), `export`
(the official layout), `recipe` (the embedded demo model's recipe).
"""
