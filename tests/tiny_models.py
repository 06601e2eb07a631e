"""The tiny timm models the method and no-sync tests build on 8×8 one-channel digits (10 classes): a ViT
and a distilled DeiT with 2×2 patches (16 patch tokens), a student 16 and a teacher 32 wide, and the
fastkd CNN teacher whose last map is 2×2. Importable from every test folder (tests/ is on sys.path)."""

VIT = "vit_tiny_patch16_224"
DEIT = "deit_tiny_distilled_patch16_224"
_VIT_OV = dict(patch_size=2, depth=4, num_heads=2, mlp_ratio=2.0, class_token=True, global_pool="token")
S_OV = dict(_VIT_OV, embed_dim=16)
T_OV = dict(_VIT_OV, embed_dim=32)
CNN_OV = dict(stem_stride=1, output_stride=16, channels=[8, 8, 16, 16])  # 8×8 input → 2×2 map
MK = dict(num_classes=10, img_size=8, in_chans=1)
