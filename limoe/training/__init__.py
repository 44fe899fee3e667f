"""Training: the loop inside DeepSpeed's engine (`trainer`), its objective (`losses`), what it
reports while it runs (`progress`) and when it ends (`final_report`)."""
