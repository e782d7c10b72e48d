variable "region" {
  description = "AWS region of the EKS cluster, e.g. us-east-1."
  type        = string
}

variable "cluster_name" {
  description = "Name of the existing EKS cluster the node group joins."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for GPU nodes (pick the AZs where you hold p5 capacity or a capacity reservation)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids needs at least one subnet."
  }
}

variable "node_role_arn" {
  description = "ARN of the existing node IAM role (AmazonEKSWorkerNodePolicy, AmazonEC2ContainerRegistryReadOnly, AmazonEKS_CNI_Policy attached). Passed in; no credentials live here."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-zA-Z-]*:iam::[0-9]{12}:role/.+", var.node_role_arn))
    error_message = "node_role_arn must be an IAM role ARN."
  }
}

variable "instance_types" {
  description = "GPU instance types of the node group."
  type        = list(string)
  default     = ["p5.48xlarge"]
}

variable "gpus_per_node" {
  description = "GPUs per instance (p5.48xlarge: 8 H100 80GB). Advertised to the cluster autoscaler for scale-from-zero."
  type        = number
  default     = 8
}

variable "gpu_product" {
  description = "Value of the k8s.amazonaws.com/accelerator label, which the cluster autoscaler uses to recognise GPU nodes."
  type        = string
  default     = "nvidia-h100"
}

variable "max_size" {
  description = "Upper bound of the GPU node group (the group scales from zero). 18: the prod training quota (128 GPUs = 16 nodes, infra/platform/overlays/prod, Kueue) plus 2 nodes for GPU endpoints."
  type        = number
  default     = 18

  validation {
    condition     = var.max_size >= 1
    error_message = "max_size must be at least 1."
  }
}

variable "capacity_type" {
  description = "ON_DEMAND or SPOT."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.capacity_type)
    error_message = "capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "disk_size_gb" {
  description = "Root volume size of GPU nodes."
  type        = number
  default     = 500
}

variable "kubernetes_version" {
  description = "Kubernetes version of the node group (null: the cluster's version)."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags on every AWS resource this module creates."
  type        = map(string)
  default = {
    "app.kubernetes.io/part-of" = "onevision-platform"
  }
}
