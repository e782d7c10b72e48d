"""The train step: one stage of the recipe, torchrun in the pod or a Kubeflow Trainer TrainJob across nodes."""
