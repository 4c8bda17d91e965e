"""mtl-clippy: multitask ranking on AliExpress and training stability with Clippy AdaGrad."""

__version__ = "0.1.0"
