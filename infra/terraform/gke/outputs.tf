output "gpu_node_pool" {
  description = "Name of the GPU node pool."
  value       = google_container_node_pool.gpu.name
}

output "system_node_pool" {
  description = "Name of the CPU system node pool."
  value       = google_container_node_pool.system.name
}

output "gpu_node_labels" {
  description = "Labels on every GPU node; GPU workloads select onevision/pool=gpu."
  value       = local.gpu_node_labels
}

output "gpu_node_taint" {
  description = "Taint on every GPU node; GPU workloads and the GPU operator tolerate it."
  value       = "nvidia.com/gpu=present:NoSchedule"
}

output "gpu_capacity" {
  description = "Largest number of GPUs the pool can scale to (max_nodes per zone)."
  value = {
    gpu_type       = var.gpu_type
    gpus_per_node  = var.gpu_count
    max_nodes_zone = var.max_nodes
  }
}
