"""Datasets: the bundled Fashion-MNIST loader, image folders, NIPS 2017 layouts, PNG writing."""
