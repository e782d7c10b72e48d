# GPU managed node group for an existing EKS cluster.
#
# Contract with our manifests (serving/manifests.py, infra/serving, Trainer runtimes):
#   - GPU nodes carry the taint nvidia.com/gpu=present:NoSchedule, so only pods that tolerate
#     nvidia.com/gpu (InferenceServices, TrainJobs, GPU operator daemonsets) land there;
#   - GPU nodes carry the label onevision/pool=gpu, which GPU workloads select;
#   - nvidia.com/gpu.present=true is the label the GPU operator itself puts on GPU nodes; setting it
#     here puts it in the autoscaler's node template too, so pods selecting it can scale the pool
#     up from zero.

locals {
  gpu_node_labels = {
    "onevision/pool"         = "gpu"
    "nvidia.com/gpu.present" = "true"
    # The cluster autoscaler's GPU label on AWS: it then waits for the device plugin to advertise
    # nvidia.com/gpu on a new node instead of treating the node as ready-without-GPUs.
    "k8s.amazonaws.com/accelerator" = var.gpu_product
  }

  # Scale from zero: with no running node to copy, the cluster autoscaler builds its node template
  # from these tags (labels, taint, extended resources). Without them it could not tell that a new
  # node would offer nvidia.com/gpu, carry onevision/pool=gpu and the GPU taint, so a pending GPU
  # pod would never scale the group up from 0. The "enabled" and cluster tags are what
  # --node-group-auto-discovery matches on.
  cluster_autoscaler_tags = {
    "k8s.io/cluster-autoscaler/enabled"                                           = "true"
    "k8s.io/cluster-autoscaler/${var.cluster_name}"                               = "owned"
    "k8s.io/cluster-autoscaler/node-template/label/onevision/pool"                = "gpu"
    "k8s.io/cluster-autoscaler/node-template/label/nvidia.com/gpu.present"        = "true"
    "k8s.io/cluster-autoscaler/node-template/label/k8s.amazonaws.com/accelerator" = var.gpu_product
    "k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"                = "present:NoSchedule"
    "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"            = tostring(var.gpus_per_node)
  }
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = var.cluster_name
  node_group_name = "${var.cluster_name}-gpu"
  node_role_arn   = var.node_role_arn
  subnet_ids      = var.subnet_ids
  version         = var.kubernetes_version

  # EKS-optimised Amazon Linux 2023 with the NVIDIA driver and container toolkit baked in
  # (the GPU operator runs with driver/toolkit disabled here: infra/gpu-operator/values-eks.yaml).
  ami_type       = "AL2023_x86_64_NVIDIA"
  instance_types = var.instance_types
  capacity_type  = var.capacity_type
  disk_size      = var.disk_size_gb

  scaling_config {
    min_size     = 0
    desired_size = 0
    max_size     = var.max_size
  }

  update_config {
    max_unavailable = 1
  }

  labels = local.gpu_node_labels

  taint {
    key    = "nvidia.com/gpu"
    value  = "present"
    effect = "NO_SCHEDULE"
  }

  tags = merge(var.tags, local.cluster_autoscaler_tags)

  lifecycle {
    # The cluster autoscaler owns desired_size; a later apply must not scale the group back to 0.
    ignore_changes = [scaling_config[0].desired_size]
  }
}

# Tags on aws_eks_node_group stay on the EKS resource; EKS does not copy them to the Auto Scaling
# group behind it, and the cluster autoscaler reads the node-template tags from the ASG.
resource "aws_autoscaling_group_tag" "gpu_cluster_autoscaler" {
  for_each = local.cluster_autoscaler_tags

  autoscaling_group_name = aws_eks_node_group.gpu.resources[0].autoscaling_groups[0].name

  tag {
    key                 = each.key
    value               = each.value
    propagate_at_launch = false
  }
}
