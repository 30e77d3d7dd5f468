"""The Chimera draft in plain PyTorch: its layers, the draft itself, draft trees and checkpoints."""
