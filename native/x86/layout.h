/* Where the VMM puts boot data in guest-physical memory (docs/machine.md). */
#ifndef FL_X86_LAYOUT_H
#define FL_X86_LAYOUT_H

#define FL_GDT_GPA 0x500ULL
#define FL_START_INFO_GPA 0x6000ULL  /* hvm_start_info */
#define FL_MODLIST_GPA 0x6040ULL     /* hvm_modlist_entry[1] */
#define FL_MEMMAP_GPA 0x6080ULL      /* hvm_memmap_table_entry[] */
#define FL_ZERO_PAGE_GPA 0x7000ULL   /* Linux boot_params */
#define FL_PML4_GPA 0x9000ULL	     /* identity page tables for a 64-bit entry */
#define FL_PDPT_GPA 0xa000ULL
#define FL_PD_GPA 0xb000ULL	     /* four pages: 4 GiB of 2 MiB pages */
#define FL_CMDLINE_GPA 0x20000ULL
#define FL_EBDA_GPA 0x9fc00ULL
#define FL_LOW_RAM_END 0xa0000ULL
#define FL_ACPI_GPA 0xe0000ULL	     /* RSDP first, so the legacy scan finds it */
#define FL_ACPI_END 0xffff0ULL      /* the tables end below the reset vector */
#define FL_RESET_VECTOR_GPA 0xffff0ULL /* F000:FFF0, where a "BIOS" reboot jumps */
#define FL_BIOS_END 0x100000ULL
#define FL_KERNEL_GPA 0x100000ULL    /* bzImage protected-mode code; ELF floor */
#define FL_IOAPIC_GPA 0xfec00000ULL
#define FL_LAPIC_GPA 0xfee00000ULL

#endif
