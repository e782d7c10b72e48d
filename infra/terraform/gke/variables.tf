variable "project" {
  description = "Google Cloud project id that owns the GKE cluster."
  type        = string
}

variable "region" {
  description = "Region of the (regional) GKE cluster, e.g. us-central1."
  type        = string
}

variable "cluster_name" {
  description = "Name of the existing GKE Standard cluster the node pools join."
  type        = string
}

variable "gpu_type" {
  description = "GKE accelerator type attached to each GPU node."
  type        = string
  default     = "nvidia-h100-80gb"
}

variable "gpu_count" {
  description = "GPUs per node. Must match the machine type (a3-highgpu-8g carries 8 H100 80GB)."
  type        = number
  default     = 8

  validation {
    condition     = var.gpu_count >= 1
    error_message = "gpu_count must be at least 1."
  }
}

variable "machine_type" {
  description = "Machine type of the GPU nodes."
  type        = string
  default     = "a3-highgpu-8g"
}

variable "max_nodes" {
  description = "Upper bound of the GPU pool autoscaler, per zone in gpu_node_locations. 18: the prod training quota (128 GPUs = 16 nodes, infra/platform/overlays/prod, Kueue) plus 2 nodes for GPU endpoints; the pool scales from zero, so an unused maximum costs nothing."
  type        = number
  default     = 18

  validation {
    condition     = var.max_nodes >= 1
    error_message = "max_nodes must be at least 1 (the pool still scales from zero)."
  }
}

variable "gpu_node_locations" {
  description = "Zones for the GPU pool (where the accelerator is offered and you hold quota). Empty: the cluster's zones."
  type        = list(string)
  default     = []
}

variable "gpu_spot" {
  description = "Run GPU nodes as Spot VMs (cheaper, preemptible; fine for restartable TrainJobs, not for serving)."
  type        = bool
  default     = false
}

variable "gpu_disk_size_gb" {
  description = "Boot disk size of GPU nodes (container images of the serving/training stack are large)."
  type        = number
  default     = 500
}

variable "gpu_local_ssd_count" {
  description = "Local NVMe SSDs used as ephemeral storage (model weight cache). a3-highgpu-8g bundles 16; use 0 for machine types without bundled local SSDs."
  type        = number
  default     = 16
}

variable "system_machine_type" {
  description = "Machine type of the CPU system pool (platform services, operators, autoscaler-friendly workloads)."
  type        = string
  default     = "n2-standard-8"
}

variable "system_min_nodes" {
  description = "Minimum nodes per zone in the CPU system pool."
  type        = number
  default     = 1
}

variable "system_max_nodes" {
  description = "Maximum nodes per zone in the CPU system pool."
  type        = number
  default     = 3
}

variable "node_service_account" {
  description = "Email of the least-privilege service account the nodes run as (null: the Compute Engine default)."
  type        = string
  default     = null
}
