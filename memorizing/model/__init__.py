"""The model layer: configs, layers, the kNN memory and its attention, the decoder.

Imports only memorizing.errors and memorizing.knn_api below it; the kNN
backends (memorizing.knn), data, training and tools are built on top.
"""
