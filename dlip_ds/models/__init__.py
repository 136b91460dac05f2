"""The MED model family (vit, bert, vlp), presets, checkpoint conversion and export."""
