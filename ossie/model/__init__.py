"""The gpt-oss model: its configuration, checkpoint loading, the MXFP4 format and the forward pass."""
