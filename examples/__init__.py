"""Examples: large-batch ResNet training with lars, and a ResNet-50 step benchmark."""
